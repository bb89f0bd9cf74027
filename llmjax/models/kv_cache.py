"""KV caches for decoding: how a layer's attention writes new keys/values and reads them back.

Two layouts, told apart by their keys; `Attention` calls `attend_cached` with one layer's
slice of either (the model scans the leading L axis of every leaf away):
- contiguous {"k", "v"}: [L, B, S, K, H], one slot per position, rows share a start position;
- paged {"k_pages", "v_pages": [L, P, bs, K, H], "block_tables": [L, B, M] int32,
  "seq_lens": [L, B] int32}: a pool of P pages of bs positions (PagedAttention, Kwon et al.
  2023); sequence b's position p lives in page block_tables[b, p // bs], slot p % bs, and
  seq_lens[b] counts its positions once this call's tokens are written. The small int leaves
  are repeated over L so the scan slices every leaf alike. `llmjax.decode.paged` builds it.
  With int8 (or fp8 e4m3) KV the pages hold codes, and "k_scales", "v_scales": [L, P, bs, K]
  bf16 hold one scale per (position, kv head): absmax over the head dim / 127 (fp8: / 448),
  rounded up to bf16; reads cast it to fp32. Bytes per position and head: H + 2 against bf16's
  2H (0.52x at H = 64, 0.51x at 128). KIVI (Liu et al. 2024) and KVQuant (Hooper et al. 2024)
  quantize values per token like this; one scale per token and head keeps writes independent,
  so no page is ever re-quantized.
"""
import jax
import jax.numpy as jnp

from llmjax import ops
from pallas_kernels.decode_attention import kernel_gap, paged_decode_attention
from pallas_kernels.decode_attention.reference import dequantize_pages, gather_pages, quantize_pages


def init_cache(cfg, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache {"k", "v"}: [L, B, S, K, H] zeros, S = length slots."""
    if length > cfg.max_seq_len:
        raise ValueError(f"cache length {length} exceeds model.max_seq_len={cfg.max_seq_len}")
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def is_paged(cache: dict) -> bool:
    """True for the paged layout (a whole-model cache or one layer's slice)."""
    return "block_tables" in cache


def cache_length(cache: dict) -> int:
    """Positions the (whole-model) cache can hold per sequence."""
    if is_paged(cache):
        return cache["block_tables"].shape[-1] * cache["k_pages"].shape[-3]
    return cache["k"].shape[2]


def attend_cached(q, k, v, positions, cache: dict):
    """Write k, v [B, T, K, H] at `positions` [B, T] into one layer's cache and attend q
    [B, T, N, H] over every cached position at or before each query's position.

    Returns (out [B, T, N, H], updated layer cache). Contiguous: rows of one call share a start
    position. Paged: any positions; a token is written only if its position is in
    [0, seq_lens[b]) (padding tokens carry a position past it, or -1).
    """
    if is_paged(cache):
        return _attend_paged(q, k, v, positions, cache)
    start = positions[0, 0]
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
    if q.shape[1] == 1 and jax.default_backend() == "gpu" and decode_kernel_reads(cache, q.dtype):
        out = decode_over_pages(q, cache_k, cache_v, positions)
        return out, {"k": cache_k, "v": cache_v}
    slots = jnp.arange(cache_k.shape[1])
    mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]: unwritten and future slots hidden
    dt = q.dtype
    out = ops.attention(q, cache_k.astype(dt), cache_v.astype(dt), causal=False, impl="xla", mask=mask)
    return out, {"k": cache_k, "v": cache_v}


def decode_kernel_reads(cache: dict, dtype) -> bool:
    """Whether `decode_over_pages` can read this layer's cache for queries of `dtype`: contiguous,
    in that dtype, with a page size for the kernel."""
    return (not is_paged(cache) and set(cache) == {"k", "v"} and cache["k"].dtype == dtype
            and decode_page_size(cache["k"].shape) is not None)


def decode_page_size(cache_shape) -> int | None:
    """The page size `decode_over_pages` reads a contiguous [B, S, K, H] cache with: the largest of
    64, 32, 16 dividing S, or None where the paged decode kernel has no tile (S not a multiple of
    16, or H not a power of 2 >= 16)."""
    length, head_dim = cache_shape[1], cache_shape[-1]
    return next((p for p in (64, 32, 16) if length % p == 0 and not kernel_gap(head_dim, p)), None)


def decode_over_pages(q, cache_k, cache_v, positions, *, backend="auto", interpret=False, split_counts=None):
    """One new query per row (q [B, 1, N, H]) over a contiguous cache [B, S, K, H] that already
    holds its key: the paged decode kernel with the cache read as pages (row b's page i is
    b * S / bs + i). It reads only positions 0..positions[b, 0], where XLA's masked attention
    over all S slots is ~5 kernels (scores, max, sum, weights, output); on an H200, Llama 1.1B
    at batch 1: 1.63 -> 1.51 ms/token, 405 -> 318 kernels a token. Returns [B, 1, N, H].
    With split_counts ([B, K] int32 zeros; `paged_decode_attention` says how the kernel uses
    them) it returns (that, the counts), the counts for the next layer's call.

    Raises:
      ValueError: q not one token a row, or a cache shape the kernel has no tile for.
    """
    b, length, kv_heads, head_dim = cache_k.shape
    page = decode_page_size(cache_k.shape)
    if q.ndim != 4 or q.shape[1] != 1 or page is None:
        raise ValueError(f"decode_over_pages needs q [B, 1, N, H] and a cache whose length is a "
                         f"multiple of 16 and head dim a power of 2 >= 16; got q.shape={q.shape}, "
                         f"cache shape={cache_k.shape}")
    per_row = length // page
    tables = jnp.arange(b * per_row, dtype=jnp.int32).reshape(b, per_row)
    as_pages = lambda c: c.astype(q.dtype).reshape(b * per_row, page, kv_heads, head_dim)  # noqa: E731
    result = paged_decode_attention(q[:, 0], as_pages(cache_k), as_pages(cache_v), tables, positions[:, 0] + 1,
                                    backend=backend, interpret=interpret, split_counts=split_counts)
    if split_counts is None:
        return result[:, None]
    return result[0][:, None], result[1]


def write_pages(pages, new, positions, block_tables, seq_lens):
    """Scatter new [B, T, ...] into pages [P, bs, ...] at `positions` [B, T]; tokens outside
    [0, seq_lens[b]) are dropped (their page index is pushed past the pool)."""
    pool, page_size = pages.shape[:2]
    valid = (positions >= 0) & (positions < seq_lens[:, None])  # [B, T]
    safe = jnp.clip(positions, 0, block_tables.shape[1] * page_size - 1)
    page = jnp.take_along_axis(block_tables, safe // page_size, axis=1)  # [B, T]
    page = jnp.where(valid, page, pool)
    return pages.at[page, safe % page_size].set(new.astype(pages.dtype), mode="drop")


def _attend_paged(q, k, v, positions, cache):
    tables, seq_lens = cache["block_tables"], cache["seq_lens"]
    write = lambda name, x: write_pages(cache[name], x, positions, tables, seq_lens)  # noqa: E731
    quantized = "k_scales" in cache
    if quantized:
        codes = cache["k_pages"].dtype
        (k, k_scale), (v, v_scale) = quantize_pages(k, codes), quantize_pages(v, codes)
        scales = dict(k_scales=write("k_scales", k_scale), v_scales=write("v_scales", v_scale))
    else:
        scales = {}
    new_cache = dict(cache, k_pages=write("k_pages", k), v_pages=write("v_pages", v), **scales)
    k_pages, v_pages = new_cache["k_pages"], new_cache["v_pages"]
    dt = q.dtype
    if not quantized:
        k_pages, v_pages = k_pages.astype(dt), v_pages.astype(dt)
    if q.shape[1] == 1:  # decoding: one query per sequence over its seq_lens keys
        lengths = jnp.minimum(positions[:, 0] + 1, seq_lens) * (positions[:, 0] >= 0)
        # The Pallas kernel on a GPU; elsewhere its jnp reference, chosen here without a warning.
        backend = "auto" if jax.default_backend() == "gpu" else "reference"
        out = paged_decode_attention(q[:, 0], k_pages, v_pages, tables, lengths, backend=backend, **scales)
        return out[:, None], new_cache
    # Chunked prefill: gather each sequence's pages into a contiguous view and mask causally.
    keys, values = gather_pages(k_pages, tables), gather_pages(v_pages, tables)  # [B, S, K, H]
    if quantized:
        keys = dequantize_pages(keys, gather_pages(scales["k_scales"], tables))
        values = dequantize_pages(values, gather_pages(scales["v_scales"], tables))
    slots = jnp.arange(keys.shape[1])
    mask = (slots[None, None, :] <= positions[:, :, None]) & (slots[None, None, :] < seq_lens[:, None, None])
    out = ops.attention(q, keys.astype(dt), values.astype(dt), causal=False, impl="xla", mask=mask)
    return out, new_cache
