"""KV caches for decoding: how a layer's attention writes new keys/values and reads them back.

The contiguous cache is {"k", "v"}: [L, B, S, K, H], one slot per position. `Attention`
calls `attend_cached` with the layer's slice (the leading L axis is scanned away), so a
different cache layout (e.g. paged) plugs in here without touching the model.
"""
import jax
import jax.numpy as jnp

from llmjax import ops


def init_cache(cfg, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache {"k", "v"}: [L, B, S, K, H] zeros, S = length slots."""
    if length > cfg.max_seq_len:
        raise ValueError(f"cache length {length} exceeds model.max_seq_len={cfg.max_seq_len}")
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_length(cache: dict) -> int:
    """Positions the (whole-model) cache can hold."""
    return cache["k"].shape[2]


def attend_cached(q, k, v, positions, cache: dict):
    """Write k, v [B, T, K, H] at `positions` [B, T] into one layer's cache [B, S, K, H] and
    attend q [B, T, N, H] over every slot at or before each query's position.

    Returns (out [B, T, N, H], updated layer cache). Rows of one call share a start position.
    """
    start = positions[0, 0]
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
    slots = jnp.arange(cache_k.shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]: unwritten and future slots hidden
    dt = q.dtype
    out = ops.attention(q, cache_k.astype(dt), cache_v.astype(dt), causal=False, impl="xla", mask=mask)
    return out, {"k": cache_k, "v": cache_v}
