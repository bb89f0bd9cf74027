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

from sharding.placement import state_shardings
from sharding.rules import Rules


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
