"""Bytes per device for params, grads, optimizer state and activations under a layout.

Two views of one model:
- `estimate_train_memory`: exact per-device bytes of a concrete train state under a mesh
  and rule table, summed over each leaf's shard shape: what the ZeRO stages save falls
  out of the rule presets (dp, zero1, fsdp, ...). Checked against the compiled step's
  `memory_analysis()` in tests/sharding.
- Closed forms for planning (`experiments/estimate.py`): the ZeRO paper's per-parameter
  bytes (Rajbhandari et al. 2020, section 5, mixed-precision Adam: K = 12) and the
  activation bytes per layer of Korthikanti et al. 2022 (table 2).

Psi params, N data-parallel shards, L layers, B micro-batch, T length, D d_model, A heads,
t tensor-parallel size.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.cross_entropy.api import default_n_chunks
from pallas_kernels.flash_attention.config import cudnn_flash_head_dim_ok
from sharding.axes import ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB, BATCH, EMBED, LENGTH, VOCAB
from sharding.placement import state_shardings
from sharding.rules import Rules, mesh_axes_of, resolve_rules


def tree_bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`
    (a matching tree of `jax.sharding.Sharding`): sum of shard shapes times item sizes."""
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(np.shape(x))) * np.dtype(x.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step's persistent pieces."""

    params: int
    grads: int
    opt_state: int

    @property
    def params_and_opt(self) -> int:
        """What the step takes and returns (donated): params + optimizer state."""
        return self.params + self.opt_state

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state

    def __str__(self) -> str:
        mib = lambda b: f"{b / 2**20:.3f} MiB"  # noqa: E731
        return (f"params {mib(self.params)} | grads {mib(self.grads)} | opt_state "
                f"{mib(self.opt_state)} | total {mib(self.total)}")


def estimate_train_memory(graphdef, state, mesh: Mesh, rules: str | Rules,
                          grad_dtype=np.float32) -> MemoryEstimate:
    """Predicted bytes per device of params, gradients and optimizer state for a train step.

    Gradients are accumulated in `grad_dtype` with the params' layout (the train step pins
    them so): split under fsdp (ZeRO-2/3), whole under dp and zero1.

    Args:
      graphdef: the model's graphdef (carries the logical names).
      state: {"params", "opt_state", "step"}: arrays or `jax.eval_shape` output.
      mesh, rules: as for `sharding.placement.state_shardings`.
    Returns:
      MemoryEstimate; the scalar step counter is counted with the optimizer state.
    Raises:
      ValueError: as `state_shardings`.
    """
    shardings = state_shardings(graphdef, state, mesh, rules)
    grads = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), grad_dtype), state["params"])
    rest = {k: v for k, v in state.items() if k != "params"}
    rest_sh = {k: v for k, v in shardings.items() if k != "params"}
    return MemoryEstimate(params=tree_bytes_per_device(state["params"], shardings["params"]),
                          grads=tree_bytes_per_device(grads, shardings["params"]),
                          opt_state=tree_bytes_per_device(rest, rest_sh))


# ---------------------------------------------------------------------------------------
# Closed forms for planning.

ZERO_STAGES = (0, 1, 2, 3)


def zero_bytes_per_param(stage: int, shards: int, *, param_bytes: float = 2, grad_bytes: float = 2,
                         opt_bytes: float = 12) -> float:
    """Bytes per parameter per device under ZeRO `stage` over `shards` data-parallel devices.

    Defaults are the paper's mixed-precision Adam: 2 (bf16 params) + 2 (bf16 grads) + 12
    (fp32 master copy, momentum, variance). Stage 0: (2+2+12); 1: 2+2+12/N; 2: 2+(2+12)/N;
    3: (2+2+12)/N.

    Raises:
      ValueError: stage not in 0..3 or shards < 1.
    """
    if stage not in ZERO_STAGES or shards < 1:
        raise ValueError(f"ZeRO stage={stage}, shards={shards}: stage must be 0-3 and shards >= 1")
    split = (0, opt_bytes, opt_bytes + grad_bytes, opt_bytes + grad_bytes + param_bytes)[stage]
    whole = param_bytes + grad_bytes + opt_bytes - split
    return whole + split / shards


def zero_formula(stage: int, *, param_bytes: float = 2, grad_bytes: float = 2,
                 opt_bytes: float = 12) -> str:
    """The printed form of `zero_bytes_per_param`, e.g. "(2+2+12)Ψ/N" for stage 3."""
    p, g, k = (f"{v:g}" for v in (param_bytes, grad_bytes, opt_bytes))
    return {0: f"({p}+{g}+{k})Ψ", 1: f"({p}+{g})Ψ + {k}Ψ/N", 2: f"{p}Ψ + ({g}+{k})Ψ/N",
            3: f"({p}+{g}+{k})Ψ/N"}[stage]


def activation_bytes_per_layer(batch: int, seq_len: int, d_model: int, n_heads: int, *,
                               tensor: int = 1, sequence_parallel: bool = False,
                               flash: bool = True, recompute: bool = False) -> float:
    """Activation bytes one layer keeps for the backward pass, 16-bit activations.

    Korthikanti et al. 2022, table 2: T·B·D·(34 + 5·A·T/D) unsplit; with tensor parallel
    T·B·D·(10 + 24/t + 5·A·T/(D·t)); with sequence parallel as well T·B·D·(34/t + 5·A·T/(D·t)).
    `flash` drops the 5·A·T/D term (scores are recomputed, not stored); `recompute`
    (full activation checkpointing) keeps only the layer input, 2·T·B·D (/t with sp).
    The 34 counts dropout masks our models do not have: an upper bound by ~10%.
    """
    sbh = seq_len * batch * d_model
    attn = 0.0 if flash else 5 * n_heads * seq_len / d_model
    if recompute:
        return 2 * sbh / (tensor if sequence_parallel else 1)
    if sequence_parallel:
        return sbh * (34 + attn) / tensor
    return sbh * (10 + 24 / tensor + attn / tensor)


# ---------------------------------------------------------------------------------------
# Activations saved for the backward pass, per device, under a mesh + rules + remat policy.

REMAT_POLICIES = ("none", "full", "dots")


def _tensor_ways(dims: tuple[str, ...], shape: dict[str, int], rules: dict) -> int:
    """Devices one activation is split over: each dim's mesh axes, each mesh axis once
    (first dim wins, as a PartitionSpec allows)."""
    used, ways = set(), 1
    for name in dims:
        for axis in mesh_axes_of(rules.get(name)):
            if axis not in used:
                used.add(axis)
                ways *= shape.get(axis, 1)
    return ways


def _on_cpu(platform: str | None) -> bool:
    return (platform or jax.default_backend()) == "cpu"


def flash_attention_used(model_cfg, platform: str | None = None) -> bool:
    """Whether the model's attention is a fused kernel that keeps O(T) statistics for the
    backward pass instead of the [B, N, T, T] scores: cuDNN or our Pallas kernel on a GPU, and
    `auto` there for 16-bit inputs and a head dim cuDNN takes (Hopper's rule; the rule of
    `llmjax.ops.attention`). On a CPU every impl
    materializes the scores (Pallas runs its reference there)."""
    if _on_cpu(platform):
        return False
    impl = model_cfg.attention_impl
    return impl in ("cudnn", "pallas") or (impl == "auto" and np.dtype(model_cfg.dtype).itemsize == 2
                                           and cudnn_flash_head_dim_ok(model_cfg.head_dim))


def layer_activation_bytes(model_cfg, mesh_shape: dict[str, int], rules: str | Rules, *,
                           micro_batch: int, seq_len: int, remat: str = "none",
                           platform: str | None = None) -> float:
    """Bytes one layer saves for its backward pass, per device, for one micro-batch.

    What is saved (model dtype `c` bytes, scores and statistics fp32), by remat policy:
      full: the layer input x [B, T, D].
      dots: x, q [B, T, N, H], k and v [B, T, K, H], the attention and MLP output
            projections [B, T, D] each, the MLP input projection(s) [B, T, F] (2 for
            SwiGLU, 1 for GELU): `dots_with_no_batch_dims_saveable` keeps matmul outputs.
      none, compiled for a CPU (jax's `saved_residuals` on our blocks, which XLA's CPU
            backend keeps as they are): 8 [B, T, D] (residual stream, norm inputs/outputs), q,
            k, v and the attention output, scores and probabilities [B, N, T, T], 7 (SwiGLU)
            or 2 (GELU: the input projection and the GELU output; the activation is
            rematerialized) [B, T, F], and row statistics (4 [B, T] for the norms, 2 [B, N, T]);
            plus what its compile keeps of the fused projections (measured): the q|k|v matmul's
            output beside its slices. Against compiled CPU temp bytes: llama 1.01, gpt2 0.96.
      none, compiled for a GPU (`platform` other than "cpu"): XLA fuses the elementwise
            producers of most of those into their consumers and recomputes them there, so it
            keeps 4 [B, T, D] (the two norms' inputs and outputs), q, k, v, the attention
            output, 3 [B, T, F] for SwiGLU (gate, up and their product) and 2 for GELU (the
            input projection and the GELU output: the activations are rematerialized,
            `llmjax.models.moe.ffn`), the statistics, and the scores only
            where attention is not a flash kernel (`flash_attention_used`). Fitted on an H100
            (benchmarks/results/train-* and shard_sweep-*): the per-token slope of compiled
            temp bytes between batch sizes is 14.8 [B, T, D] units per layer for Llama 1.1B
            (this list: 14.5) and 20.3 for GPT-2 124M (then 20, one [B, T, F] more than now).
    Each tensor is divided by the devices its logical dims are split over under `rules`
    (batch, length, act_embed, act_heads, act_mlp). `platform`: "cpu", "gpu", ... (default
    jax's default backend).

    Raises:
      ValueError: unknown remat policy, or unknown preset / invalid table.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r} unknown; use one of {', '.join(REMAT_POLICIES)}")
    table = dict(resolve_rules(rules)[0])
    c = np.dtype(model_cfg.dtype).itemsize
    b, t, d, f = micro_batch, seq_len, model_cfg.d_model, model_cfg.d_mlp
    n, k, h = model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.d_model // model_cfg.n_heads
    swiglu = model_cfg.family == "llama"

    def size(dims, elements, itemsize=c):
        return elements * itemsize / _tensor_ways(dims, mesh_shape, table)

    btd = size((BATCH, LENGTH, ACT_EMBED), b * t * d)
    q = size((BATCH, LENGTH, ACT_HEADS), b * t * n * h)
    kv = size((BATCH, LENGTH, ACT_HEADS), b * t * k * h)
    btf = size((BATCH, LENGTH, ACT_MLP), b * t * f)
    if remat == "full":
        return btd
    if remat == "dots":
        return 3 * btd + q + 2 * kv + (2 if swiglu else 1) * btf
    scores = 0.0 if flash_attention_used(model_cfg, platform) else size((BATCH, ACT_HEADS, LENGTH), b * n * t * t, 4)
    stats = size((BATCH, LENGTH), 4 * b * t, 4) + size((BATCH, ACT_HEADS, LENGTH), 2 * b * n * t, 4)
    if _on_cpu(platform):
        return 8 * btd + 3 * q + 4 * kv + 2 * scores + (7 if swiglu else 2) * btf + stats
    return 4 * btd + 2 * q + 2 * kv + 2 * scores + (3 if swiglu else 2) * btf + stats


def loss_activation_bytes(model_cfg, mesh_shape: dict[str, int], rules: str | Rules, *,
                          micro_batch: int, seq_len: int) -> float:
    """Bytes per device the vocabulary projection and loss hold at the step's peak.

    `loss_impl` xla: the fp32 logits and their softmax [B, T, V]. fused
    (`pallas_kernels.cross_entropy`): one token chunk's logits [B·T / n_chunks, V] (its default
    chunking) in the compute dtype and, for 16-bit compute, their gradient in it beside them (an
    fp32 gradient overwrites the logits), plus the fp32 gradient accumulator of the vocabulary
    weight [V, D].
    """
    table = dict(resolve_rules(rules)[0])
    tokens, vocab = micro_batch * seq_len, model_cfg.vocab_size
    act_ways = _tensor_ways((BATCH, LENGTH, ACT_VOCAB), mesh_shape, table)
    if model_cfg.loss_impl != "fused":
        return 2 * tokens * vocab * 4 / act_ways
    c = np.dtype(model_cfg.dtype).itemsize
    chunk = tokens / default_n_chunks(tokens, vocab)
    return chunk * vocab * (c + (c if c < 4 else 0)) / act_ways + vocab * model_cfg.d_model * 4 / _tensor_ways(
        (VOCAB, EMBED), mesh_shape, table)


def activation_bytes(model_cfg, mesh_shape: dict[str, int], rules: str | Rules, *,
                     micro_batch: int, seq_len: int, remat: str = "none", platform: str | None = None) -> float:
    """Activation bytes per device at the peak of a training step, for one micro-batch.

    The saved activations of this device's layers (n_layers / pipeline), plus, under
    remat, what the backward of one layer recomputes (its `none` activations less those
    saved), plus the head's logits (`loss_activation_bytes`). Measured against the compiled
    step on CPU (tests/sharding/test_memory.py): within ~20%; XLA's buffer reuse and
    backward workspace are not modelled. Not counted here: the compute-dtype copies of the
    weights a mixed-precision step keeps for its backward (c bytes per parameter on a GPU; with
    params already in the compute dtype, the side-by-side q|k|v and gate|up weights of the
    fused projections are such a copy of those weights), and, with unrolled layers, the
    per-layer gradient pieces alive until they are concatenated into the stacked gradient
    (Llama 1.1B B16 on an H200: compiled temp 50.9 GiB where this model gives 43.4).

    Raises:
      ValueError: as `layer_activation_bytes`.
    """
    layers = model_cfg.n_layers // mesh_shape.get("pipeline", 1)
    per_layer = {policy: layer_activation_bytes(model_cfg, mesh_shape, rules, micro_batch=micro_batch,
                                                seq_len=seq_len, remat=policy, platform=platform)
                 for policy in dict.fromkeys((remat, "none"))}
    recompute = per_layer["none"] - per_layer[remat]
    return layers * per_layer[remat] + recompute + loss_activation_bytes(
        model_cfg, mesh_shape, rules, micro_batch=micro_batch, seq_len=seq_len)


def pipeline_activation_bytes(model_cfg, mesh_shape: dict[str, int], rules: str | Rules, *,
                              micro_batch: int, seq_len: int, in_flight: int,
                              remat: str = "none", platform: str | None = None) -> float:
    """Activation bytes per device of a pipeline stage (`sharding.pipeline`): the inputs
    [B, T, D] of the `in_flight` microbatches it keeps between forward and backward
    (`schedule_stats(...)["max_in_flight"]`: m for GPipe, <= p for 1F1B), plus one
    microbatch's backward through its n_layers / pipeline layers (`activation_bytes`).
    `micro_batch` is the pipeline microbatch (micro-batch / mesh.pp_microbatches)."""
    kept = layer_activation_bytes(model_cfg, mesh_shape, rules, micro_batch=micro_batch,
                                  seq_len=seq_len, remat="full", platform=platform)
    return in_flight * kept + activation_bytes(model_cfg, mesh_shape, rules, micro_batch=micro_batch,
                                               seq_len=seq_len, remat=remat, platform=platform)
