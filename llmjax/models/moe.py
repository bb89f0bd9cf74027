"""Mixture-of-experts feed-forward block: a top-k softmax router, auxiliary losses, capacity
dropping or dropless grouped matmuls, and expert parallelism by all-to-all.

Router (Shazeer et al. 2017): softmax over experts in fp32, the top-k experts per token, and
their probabilities renormalized to sum to 1 (as Mixtral does), so the block's output scale does
not depend on how peaked the router is. With top_k=1 the weight is then always 1 and the router
learns only from the auxiliary losses: use top_k >= 2.
Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e, with f_e
the fraction of token->expert assignments sent to expert e and P_e the mean router probability
of e; it is 1 at uniform routing. Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): the mean over
tokens of logsumexp(logits)^2.
Capacity (GShard, Lepikhin et al. 2020): with model.moe_capacity_factor > 0 each expert has
ceil(factor * tokens * top_k / experts) slots over the tokens of the call (the whole micro-batch,
also under expert parallelism). Assignments claim slots in priority order: every token's first
choice in token order (batch row, then position), then every second choice, and so on; an
assignment past its expert's last slot is dropped (it adds 0; the residual carries the token).

model.moe_impl: `ragged` groups assignments by expert and runs the experts as grouped matmuls,
the FLOPs of the routed tokens only; `dense` runs every expert on every token and combines with
the routing weights (the reference). The grouped matmuls (MoE's `grouped_matmul`): "triton",
the Pallas kernels of pallas_kernels/grouped_matmul (rows placed once in a layout padded per
expert to the row tile, all of an expert MLP's matmuls run in it, placed back once; on CPU in
interpret mode, for tests), "mosaic" (the same with the Mosaic GPU rows kernel; Hopper, 16-bit),
or "xla", `jax.lax.ragged_dot` (XLA's GPU rewriter turns it into a dense dot over all experts,
E times the FLOPs: xla/hlo/transforms/expanders/ragged_dot_rewriter.cc, RaggedToDense); "auto"
is "mosaic" on Hopper for 16-bit compute, else "triton" on a GPU, and "xla" elsewhere.

Expert parallelism: when the active logical rules map `experts` to mesh axes of size > 1 (ragged
impl), each device holds E / n experts, and assignments travel to their expert's device and back
by all-to-all inside `jax.shard_map`. The exchange buffers have a fixed size per peer: dropless,
all of a device's assignments (any one peer may receive them all), so n times the local
assignments; with a capacity factor, at most (E / n) * capacity rows.

G tokens, A = G*k assignments, E experts, D d_model, F mlp (per expert), k top_k, n expert shards.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from llmjax.config import ModelConfig
from pallas_kernels.grouped_matmul import api as gmm
from pallas_kernels.grouped_matmul.config import default_tile_m
from sharding.axes import BATCH, EMBED, EXPERTS, LENGTH, MLP
from sharding.placement import active_layout, logical_to_spec
from sharding.rules import mesh_axes_of


def param(rngs, shape, axes, dtype, std=None, fill=0.0):
    """A parameter with logical axis names: normal(std) init, or constant `fill` when std is None."""
    init = nnx.initializers.normal(std) if std is not None else nnx.initializers.constant(fill)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, dtype))


# The activations are rematerialized: the backward keeps only their inputs (the matmul outputs,
# which exist anyway) and recomputes the tanh / sigmoid inside its own fusion, instead of XLA
# writing that intermediate in the forward and reading it back (one [tokens, F] tensor less each
# way; GPT-2 124M on an H200: the GELU fusions ran at 3 tensors forward, 4 backward).
@jax.checkpoint
def _gelu_of_sum(y, b):
    return jax.nn.gelu(y + b, approximate=True)


@jax.checkpoint
def _swiglu_stacked(gate_up):
    gate, up = jax.lax.split(gate_up, [1, 1], axis=-2)  # [..., 1, F] each
    return (jax.nn.silu(gate) * up).squeeze(-2)


@jax.checkpoint
def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


def ffn(x, weights: dict, matmul, bias):
    """The feed-forward math of the dense MLP and of each expert.

    GELU(x W_in + b_in) W_out + b_out when `weights` has no gate (gpt2), else
    (silu(x W_gate) * x W_in) W_out (llama, SwiGLU), with W_gate and W_in either apart or stacked
    as "w_gate_in" [D, 2, F] (one matmul). `matmul(x, w)` applies the right weight to each row
    (a plain matmul, a batched one over experts, or a grouped one); `bias(b)` gives the bias
    each row adds.
    """
    if "w_gate_in" in weights:
        hidden = _swiglu_stacked(matmul(x, weights["w_gate_in"]))
    elif "w_gate" in weights:
        hidden = _swiglu(matmul(x, weights["w_gate"]), matmul(x, weights["w_in"]))
    else:
        hidden = _gelu_of_sum(matmul(x, weights["w_in"]), bias(weights["b_in"]))
    y = matmul(hidden, weights["w_out"])
    return y + bias(weights["b_out"]) if "b_out" in weights else y


def route(logits, top_k: int):
    """Softmax top-k routing.

    Args:
      logits: [..., E] router logits (fp32).
    Returns:
      probs [..., E], weights [..., k] (the top-k probabilities renormalized to sum to 1) and
      expert ids [..., k] int32, best first.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    top, ids = jax.lax.top_k(probs, top_k)
    return probs, top / top.sum(-1, keepdims=True), ids


def expert_load(ids, n_experts: int):
    """Fraction of the assignments ids [..., k] routed to each expert: [E] fp32, sums to 1."""
    return jnp.bincount(ids.reshape(-1), length=n_experts) / ids.size


def load_balancing_loss(probs, ids, n_experts: int):
    """Switch Transformer loss E * sum_e f_e * P_e (1 at uniform routing); probs [..., E],
    ids [..., k]. Gradients flow through P_e only (f_e counts discrete choices)."""
    mean_probs = probs.reshape(-1, n_experts).mean(0)
    return n_experts * jnp.sum(expert_load(ids, n_experts) * mean_probs)


def router_z_loss(logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits [..., E])^2."""
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor * tokens * top_k / experts)."""
    return math.ceil(factor * n_tokens * top_k / n_experts)


def capacity_mask(ids, n_experts: int, capacity: int):
    """Which assignments get a slot: ids [G, k] -> keep [G, k] bool.

    Priority (see the module docstring): all first choices in token order, then all second
    choices, ...; an expert's first `capacity` assignments in that order are kept.
    """
    g, k = ids.shape
    onehot = jax.nn.one_hot(ids.T.reshape(-1), n_experts, dtype=jnp.int32)  # [k*G, E], priority order
    slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1  # [k*G] place in its expert's queue
    return (slot < capacity).reshape(k, g).T


def _combine(rows, weights):
    """Weighted sum of each token's k expert outputs: rows [G*k, D], weights [G, k] -> [G, D]."""
    g, k = weights.shape
    return jnp.einsum("gkd,gk->gd", rows.reshape(g, k, -1), weights.astype(rows.dtype))


def dense_experts(x, weights, ids, experts: dict):
    """Every expert on every token, combined by the routing weights (the reference impl).

    x [G, D]; weights, ids [G, k] (id E = no expert, weight ignored); experts: stacked weights
    with a leading E axis. Returns [G, D].
    """
    n_experts = experts["w_in"].shape[0]
    combine = jnp.einsum("gke,gk->ge", jax.nn.one_hot(ids, n_experts, dtype=x.dtype),
                         weights.astype(x.dtype))  # [G, E]; id E one-hots to zeros
    y = ffn(x, experts, jnp.matmul, lambda b: b[:, None])  # [G, D] @ [E, D, F] -> [E, G, F] ... [E, G, D]
    return jnp.einsum("ge,egd->gd", combine, y)


GROUPED_MATMULS = ("auto", "triton", "mosaic", "xla")


def resolve_grouped_matmul(grouped_matmul: str, dtype) -> str:
    """"auto" -> the Pallas kernels' choice for `dtype` on a GPU (gmm.auto_backend: Mosaic on
    Hopper for 16-bit, else Triton), "xla" elsewhere; raises ValueError for a name not in
    GROUPED_MATMULS."""
    if grouped_matmul not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul={grouped_matmul!r} unknown; use one of {GROUPED_MATMULS}")
    if grouped_matmul == "auto":
        return gmm.auto_backend(dtype) if jax.default_backend() == "gpu" else "xla"
    return grouped_matmul


def _bias_rows(bias, row_expert):
    """Each row's expert bias, [E, N] -> [rows, N], in the bias's dtype. The lookup runs in fp32
    so that its gradient, a scatter-add of every row into its expert's bias, sums in fp32 (in
    bf16 that sum was 4-9% further from the fp32 reference than the dense impl's)."""
    return jnp.take(bias.astype(jnp.float32), row_expert, axis=0, mode="clip").astype(bias.dtype)


def _pallas_grouped_ffn(rows, row_expert, experts: dict, backend: str):
    """grouped_ffn through the Pallas kernels: one gather into the padded layout, every matmul
    of the expert MLP in it (padding rows stay apart: each row's output depends on it alone),
    one gather back; rows with id E are not placed and come back 0."""
    n_experts = experts["w_in"].shape[0]
    layout = gmm.make_layout(row_expert, n_experts, default_tile_m(rows.shape[0], rows.dtype, backend))
    interpret = jax.default_backend() != "gpu"
    row_group = layout.padded_row_group()  # [P]; E on spare tiles, clipped for the bias lookup
    y = ffn(gmm.pad_rows(rows, layout), experts,
            lambda a, w: gmm.padded_grouped_matmul(a, w, layout, backend=backend, interpret=interpret),
            lambda b: _bias_rows(b, row_group))
    return gmm.unpad_rows(y, layout)


def grouped_ffn(rows, row_expert, experts: dict, grouped_matmul: str = "auto"):
    """Each row through its own expert with grouped matmuls; rows with id E (no expert) give 0.

    rows [A, D]; row_expert [A] int32 in [0, E]; experts: stacked weights with a leading E axis;
    grouped_matmul: one of GROUPED_MATMULS (see the module docstring).
    Returns [A, D] in the order of `rows`.
    """
    backend = resolve_grouped_matmul(grouped_matmul, rows.dtype)
    if backend != "xla":
        return _pallas_grouped_ffn(rows, row_expert, experts, backend)
    n_experts = experts["w_in"].shape[0]
    order = jnp.argsort(row_expert, stable=True)
    sorted_expert = row_expert[order]
    group_sizes = jnp.bincount(row_expert, length=n_experts)  # id E falls outside: not computed
    y = ffn(rows[order], experts, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes),
            lambda b: _bias_rows(b, sorted_expert))
    y = jnp.where((sorted_expert < n_experts)[:, None], y, 0)
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def ragged_experts(x, weights, ids, experts: dict, grouped_matmul: str = "auto"):
    """Dropless (or capacity-masked) grouped-matmul MoE on local tokens: x [G, D], weights and
    ids [G, k] (id E = dropped) -> [G, D]."""
    rows = jnp.repeat(x, ids.shape[1], axis=0)  # [G*k, D]: row a is token a // k
    return _combine(grouped_ffn(rows, ids.reshape(-1), experts, grouped_matmul), weights)


def _exchange(rows, row_expert, experts: dict, n_experts: int, axes, slots: int, grouped_matmul: str):
    """Expert-parallel grouped FFN inside shard_map: send each row to the device holding its
    expert, compute there, send the result back.

    rows [A, D], row_expert [A] (global ids, E = no expert); experts: this device's E / n experts.
    Buffers are [n, slots, D]: `slots` bounds the rows one device sends to another.
    """
    n = n_experts // experts["w_in"].shape[0]
    local_experts = n_experts // n
    order = jnp.argsort(row_expert, stable=True)
    sorted_expert = row_expert[order]
    dest = sorted_expert // local_experts  # [A] target shard; n for dropped rows
    counts = jnp.bincount(dest, length=n)
    first = jnp.cumsum(counts) - counts  # where each target's run starts in sorted order
    slot = jnp.arange(rows.shape[0]) - jnp.take(first, dest, mode="clip")
    send = jnp.zeros((n, slots, rows.shape[1]), rows.dtype).at[dest, slot].set(rows[order], mode="drop")
    send_expert = jnp.full((n, slots), local_experts, jnp.int32).at[dest, slot].set(
        sorted_expert % local_experts, mode="drop")
    recv = jax.lax.all_to_all(send, axes, 0, 0)  # [n sources, slots, D]
    recv_expert = jax.lax.all_to_all(send_expert, axes, 0, 0)
    y = grouped_ffn(recv.reshape(n * slots, -1), recv_expert.reshape(-1), experts, grouped_matmul)
    back = jax.lax.all_to_all(y.reshape(n, slots, -1), axes, 0, 0)  # [n targets, slots, D]
    y_sorted = back.at[dest, slot].get(mode="fill", fill_value=0)
    return jnp.zeros_like(rows).at[order].set(y_sorted, unique_indices=True)


def expert_parallel(x, weights, ids, experts: dict, layout, capacity: int | None,
                    grouped_matmul: str = "auto"):
    """`ragged_experts` with experts split over the mesh axes the `experts` rule names.

    x [B, T, D]; weights, ids [B, T, k]; layout = (abstract mesh, rule dict) from
    `sharding.placement.active_layout`; capacity: slots per expert, or None when dropless;
    grouped_matmul as in grouped_ffn.
    Raises:
      ValueError: E not divisible by the expert axes, or tokens not split over them.
    """
    mesh, rules = layout
    n_experts, k = experts["w_in"].shape[0], ids.shape[-1]
    axes = mesh_axes_of(rules.get(EXPERTS))
    n = math.prod(mesh.shape[a] for a in axes)
    token_spec = logical_to_spec((BATCH, LENGTH, None), rules)
    token_axes = {a for entry in token_spec for a in mesh_axes_of(entry)}
    if n_experts % n:
        raise ValueError(f"model.n_experts={n_experts} is not divisible by the {n} devices of mesh "
                         f"axes {axes} that the rules split experts over")
    if not set(axes) <= token_axes:
        raise ValueError(f"the rules split experts over {axes} but tokens over {sorted(token_axes)}; "
                         "expert parallelism needs the batch (or length) rule to split over "
                         f"{axes} too (see the 'ep' preset)")

    def local(x, weights, ids, experts):
        b, t, d = x.shape
        slots = b * t * k if capacity is None else min(b * t * k, capacity * (n_experts // n))
        rows = jnp.repeat(x.reshape(b * t, d), k, axis=0)
        y = _exchange(rows, ids.reshape(-1), experts, n_experts, axes, slots, grouped_matmul)
        return _combine(y, weights.reshape(b * t, k)).reshape(b, t, d)

    expert_specs = {name: PartitionSpec(axes) for name in experts}
    return jax.shard_map(local, in_specs=(token_spec, token_spec, token_spec, expert_specs),
                         out_specs=token_spec)(x, weights, ids, experts)


class MoE(nnx.Module):
    """Routed experts in place of the dense feed-forward (shared experts live in the Block).

    Each expert is the family's MLP (GELU with biases for gpt2, SwiGLU for llama) of width
    model.d_mlp; weights are stacked on a leading `experts` axis. `grouped_matmul` picks the
    grouped matmuls of moe_impl=ragged: "auto", "triton", "mosaic" or "xla" (module docstring).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, grouped_matmul: str = "auto"):
        self.cfg = cfg
        resolve_grouped_matmul(grouped_matmul, cfg.dtype)  # an unknown name fails here, not at the first call
        self.grouped_matmul = grouped_matmul
        e, d, f = cfg.n_experts, cfg.d_model, cfg.d_mlp
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # GPT-2: scale residual projections by 1/sqrt(2L)
        self.router = param(rngs, (d, e), (EMBED, None), pd, std)
        self.w_in = param(rngs, (e, d, f), (EXPERTS, EMBED, MLP), pd, std)
        self.w_out = param(rngs, (e, f, d), (EXPERTS, MLP, EMBED), pd, out_std)
        if cfg.family == "gpt2":
            self.b_in = param(rngs, (e, f), (EXPERTS, MLP), pd)
            self.b_out = param(rngs, (e, d), (EXPERTS, EMBED), pd)
            self.w_gate = None
        else:
            self.w_gate = param(rngs, (e, d, f), (EXPERTS, EMBED, MLP), pd, std)
            self.b_in = self.b_out = None

    def experts(self, dtype) -> dict:
        """The expert weights present in this family, cast to `dtype`, each [E, ...]."""
        names = ("w_in", "w_gate", "w_out", "b_in", "b_out")
        return {n: getattr(self, n)[...].astype(dtype) for n in names if getattr(self, n) is not None}

    def __call__(self, x):
        """x [B, T, D] -> (y [B, T, D], aux).

        aux: "aux_loss" (load balancing, unweighted), "z_loss" (unweighted), "load" [E] (fraction
        of assignments per expert, before capacity dropping) and, with a capacity factor,
        "dropped" (fraction of assignments dropped).
        """
        cfg = self.cfg
        b, t, d = x.shape
        e, k = cfg.n_experts, cfg.moe_top_k
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        probs, weights, ids = route(logits, k)  # [B, T, E], [B, T, k], [B, T, k]
        aux = {"aux_loss": load_balancing_loss(probs, ids, e), "z_loss": router_z_loss(logits),
               "load": expert_load(ids, e)}
        capacity = None
        if cfg.moe_capacity_factor:
            capacity = expert_capacity(b * t, k, e, cfg.moe_capacity_factor)
            keep = capacity_mask(ids.reshape(b * t, k), e, capacity).reshape(b, t, k)
            ids, weights = jnp.where(keep, ids, e), jnp.where(keep, weights, 0.0)  # id E: dropped
            aux["dropped"] = 1.0 - keep.mean()
        experts = self.experts(x.dtype)
        layout = active_layout()
        n_shards = 1
        if layout is not None:
            mesh, rules = layout
            n_shards = math.prod(mesh.shape[a] for a in mesh_axes_of(rules.get(EXPERTS)))
        if cfg.moe_impl == "ragged" and n_shards > 1:
            return expert_parallel(x, weights, ids, experts, layout, capacity, self.grouped_matmul), aux
        flat = (x.reshape(b * t, d), weights.reshape(b * t, k), ids.reshape(b * t, k), experts)
        y = dense_experts(*flat) if cfg.moe_impl == "dense" else ragged_experts(*flat, self.grouped_matmul)
        return y.reshape(b, t, d), aux
