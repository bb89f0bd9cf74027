"""Paged decode attention in plain jnp (fp32): the definition of correct.

B batch, N query heads, K kv heads, G = N // K, H head dim, P pages in the pool, bs page size,
M pages per sequence (block table width), S = M * bs.
"""
import jax
import jax.numpy as jnp

# Finite, not -inf: a sequence of length 0 (an idle slot) gives a uniform softmax over masked
# keys instead of NaN; its output is then zeroed explicitly.
MASK_VALUE = -1e30


def contiguous_decode_attention(q, k, v, lengths, *, scale=None):
    """One query per sequence over its first `lengths[b]` keys.

    Args:
      q: [B, N, H]; k, v: [B, S, K, H], K dividing N; lengths: [B] int, 0 <= length <= S.
    Returns:
      [B, N, H] fp32; rows with length 0 are zeros.
    """
    b, n, h = q.shape
    kv_heads = k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("bkgh,bskh->bkgs", qg, k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST) * scale
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(valid[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST).reshape(b, n, h)
    return jnp.where((lengths > 0)[:, None, None], out, 0.0)


def gather_pages(pages, block_tables):
    """Pages [P, bs, ...] read through block tables [B, M] -> contiguous [B, M * bs, ...]."""
    b, m = block_tables.shape
    gathered = pages[block_tables]  # [B, M, bs, K, H]
    return gathered.reshape(b, m * pages.shape[1], *pages.shape[2:])


# Scales of 8-bit pages are stored in bf16, 2 bytes per (position, kv head) instead of fp32's 4,
# which brings int8 KV to (H + 2) / 2H of bf16's bytes (0.52x at H = 64). bf16 keeps fp32's
# exponent range, and rounding each scale up to a bf16 value (below) keeps the codes' error bound.
SCALE_DTYPE = jnp.bfloat16


def quantize_pages(x, dtype=jnp.int8):
    """Symmetric per (position, head) quantization: x [..., H] -> (codes [..., H] in `dtype`,
    scale [...] bf16), x ~ codes * scale. The scale is absmax / top rounded up to the next bf16
    value (at most 2^-7 larger), and the codes are computed against that stored scale, so
    |x - codes * scale| <= scale / 2 for int8 (top 127) and no code is clipped; float8_e4m3fn:
    top is 448, e4m3's largest finite value, and the cast rounds to nearest."""
    dtype = jnp.dtype(dtype)
    top = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    x = x.astype(jnp.float32)
    exact = jnp.max(jnp.abs(x), axis=-1) / top
    scale = exact.astype(SCALE_DTYPE)
    scale = jnp.where(scale.astype(jnp.float32) < exact, jnp.nextafter(scale, jnp.array(jnp.inf, SCALE_DTYPE)),
                      scale)
    stored = scale.astype(jnp.float32)
    q = jnp.clip(x / jnp.where(stored > 0, stored, 1.0)[..., None], -top, top)
    return (jnp.round(q) if dtype == jnp.int8 else q).astype(dtype), scale


def dequantize_pages(pages, scales):
    """8-bit pages [..., H] times their per-(position, kv head) scales [...] (cast to fp32) -> fp32."""
    return pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, scale=None,
                                     k_scales=None, v_scales=None):
    """Paged decode attention: gather each sequence's pages, then `contiguous_decode_attention`.

    Args:
      q: [B, N, H]; k_pages, v_pages: [P, bs, K, H]; block_tables: [B, M] int page ids;
      lengths: [B] int, keys of sequence b are its first lengths[b] slots (<= M * bs).
      k_scales, v_scales: None, or [P, bs, K] bf16 scales of 8-bit pages (value = page * scale).
    Returns:
      [B, N, H] fp32.
    """
    keys, values = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    if k_scales is not None:
        keys = dequantize_pages(keys, gather_pages(k_scales, block_tables))
        values = dequantize_pages(values, gather_pages(v_scales, block_tables))
    return contiguous_decode_attention(q, keys, values, lengths, scale=scale)
