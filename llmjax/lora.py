"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A target weight W of the stacked blocks is used as W + (alpha / rank) * A @ B, with W
frozen and only A, B trained. W's dims split into inputs and outputs (the dims the
forward contracts with x, and the rest): wq [L, D | N, H], wo [L, N, H | D],
w_in [L, D | F]. A is [L, *in, r], B is [L, r, *out]; A starts random
(PEFT's kaiming-uniform bound, 1/sqrt(fan_in)) and B at zero, so the adapted model
starts equal to the base.

Adapters are a nested dict mirroring the params: {"blocks": {"attn": {"wq": {"a": A, "b": B}}}}.
`merge(base, adapters, cfg)` returns a plain params tree, used both for the forward in
training and for export.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import LoraConfig

# Where each target lives in the params, how many of its dims (after the layers axis) are
# inputs (the attention output wo contracts over heads and head_dim), and its rank.
TARGETS: dict[str, tuple[tuple[str, ...], int, int]] = {
    "wq": (("blocks", "attn", "wq"), 1, 4),
    "wk": (("blocks", "attn", "wk"), 1, 4),
    "wv": (("blocks", "attn", "wv"), 1, 4),
    "wo": (("blocks", "attn", "wo"), 2, 4),
    "w_in": (("blocks", "mlp", "w_in"), 1, 3),
    "w_gate": (("blocks", "mlp", "w_gate"), 1, 3),
    "w_out": (("blocks", "mlp", "w_out"), 1, 3),
}


def _get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _targets(base: dict, cfg: LoraConfig):
    """(name, path, n_in, weight) per target; raises ValueError for a target this model lacks."""
    out = []
    for name in cfg.target_names:
        path, n_in, ndim = TARGETS[name]
        weight = _get(base, path)
        if weight is None:
            have = [t for t, (p, _, _) in TARGETS.items() if _get(base, p) is not None]
            raise ValueError(f"lora.targets names {name!r}, which this model does not have "
                             f"(GPT-2 has no w_gate); its targets are: {', '.join(have)}")
        if weight.ndim != ndim:  # e.g. MoE experts [L, E, D, F]
            raise ValueError(f"lora.targets names {name!r} of shape {tuple(weight.shape)}; LoRA supports the "
                             f"dense {ndim}-d layout only (MoE expert weights: target the attention weights)")
        out.append((name, path, n_in, weight))
    return out


def _check_on(cfg: LoraConfig):
    if cfg.rank <= 0:
        raise ValueError(f"lora.rank={cfg.rank}: LoRA is off; use the plain params (rank >= 1 for adapters)")


def _check_rank(cfg: LoraConfig, in_size: int, out_size: int, name: str):
    if cfg.rank > min(in_size, out_size):
        raise ValueError(f"lora.rank={cfg.rank} exceeds min(in, out)={min(in_size, out_size)} of {name} "
                         f"(a full-rank update); use a rank of at most {min(in_size, out_size)}")


def init_adapters(base: dict, cfg: LoraConfig, key: jax.Array) -> dict:
    """Fresh adapters for the target weights of `base` (the model's params, leading layers axis).

    Returns {"blocks": {...: {name: {"a": [L, *in, r], "b": [L, r, *out]}}}} in fp32.
    Raises:
      ValueError: rank 0 (LoRA off), a rank above a target's min(in, out), or a target the
        model does not have.
    """
    _check_on(cfg)
    adapters = {}
    targets = _targets(base, cfg)
    for (name, path, n_in, weight), k in zip(targets, jax.random.split(key, len(targets))):
        layers, ins, outs = weight.shape[0], weight.shape[1:1 + n_in], weight.shape[1 + n_in:]
        fan_in = int(np.prod(ins))
        _check_rank(cfg, fan_in, int(np.prod(outs)), name)
        bound = 1.0 / fan_in ** 0.5
        a = jax.random.uniform(k, (layers, *ins, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((layers, cfg.rank, *outs), jnp.float32)
        _set(adapters, path, {"a": a, "b": b})
    return adapters


def delta(a: jax.Array, b: jax.Array, scale: float, shape) -> jax.Array:
    """scale * A @ B per layer, reshaped to the weight's `shape` [L, *in, *out], fp32."""
    layers, rank = a.shape[0], a.shape[-1]
    prod = jnp.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1),
                      precision=jax.lax.Precision.HIGHEST)  # [L, in, r] @ [L, r, out]
    return (scale * prod).reshape(shape)


def merge(base: dict, adapters: dict, cfg: LoraConfig) -> dict:
    """The params with W + (alpha / rank) * A @ B on every target (in W's dtype; the sum in
    fp32); other leaves are `base`'s own arrays. Pure: use inside jit or on its own."""
    _check_on(cfg)
    scale = cfg.alpha / cfg.rank
    merged = jax.tree.map(lambda x: x, base)  # new dicts, same leaves
    for _, path, _, weight in _targets(base, cfg):
        ab = _get(adapters, path)
        if ab is None:
            raise ValueError(f"adapters lack {'.'.join(path)}, which lora.targets={cfg.targets!r} names")
        new = weight.astype(jnp.float32) + delta(ab["a"], ab["b"], scale, weight.shape)
        _set(merged, path, new.astype(weight.dtype))
    return merged


def count(adapters: dict) -> int:
    """Number of trainable parameters in an adapters tree."""
    return sum(x.size for x in jax.tree.leaves(adapters))


def logical_names(base_names: dict[tuple, tuple], cfg: LoraConfig, base: dict) -> dict[tuple, tuple]:
    """Logical axis names of the adapters from their weights' names (`param_logical_names`):
    A takes W's input names, B its output names; the rank dim is unsharded."""
    names = {}
    for _, path, n_in, weight in _targets(base, cfg):
        w = base_names[tuple(path)]
        names[(*path, "a")] = (w[0], *w[1:1 + n_in], None)
        names[(*path, "b")] = (w[0], None, *w[1 + n_in:])
    return names
