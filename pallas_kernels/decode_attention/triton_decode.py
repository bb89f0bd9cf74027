"""Paged decode attention in Pallas (Triton lowering), split over the key pages.

PagedAttention (Kwon et al. 2023, arXiv:2309.06180, section 4.1): keys and values live in
fixed-size pages of a shared pool; a block table maps a sequence's logical pages to physical
ones. One program per (sequence, kv head, split of the pages) holds the G query heads that
share the kv head (GQA), walks its pages `pages_per_step` at a time with an online softmax,
and writes a partial result; `merge_splits` combines the splits (flash-decoding).

B batch, N query heads, K kv heads, G = N // K, Gp the rows the kernel takes: G if G is a power
of 2, else G zero-padded to max(16, next power of 2); R = max(Gp, 16) rows in its dots. H head
dim, P pool pages, bs page size, M pages per sequence (padded to splits * pages_per_split).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._triton import MIN_DOT_ROWS, dot_precision, one_copy, repeat_rows, row_copies
from pallas_kernels.decode_attention.config import DecodeBlocks

LOG2E = math.log2(math.e)  # base 2 throughout: exp2 is the cheap exponential
# Finite, not -inf: a fully masked step gives junk that the next real maximum wipes out.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _decode_kernel(tables_ref, length_ref, q_ref, k_ref, v_ref, *refs, scale,
                   page_size, pages_per_step, pages_per_split, precision, quantized):
    """One (sequence, kv head, split) program.

    tables_ref [pages_per_split] int32 (this split's page ids); length_ref [1] int32;
    q_ref [Gp, H]; k_ref, v_ref [P, bs, H] (this kv head); o_ref [Gp, H] (fp32, or q's dtype
    with one split; normalized within the split); m_ref, l_ref [Gp] fp32: base-2 running max and softmax denominator.
    Gp < MIN_DOT_ROWS (a power of 2): the R = MIN_DOT_ROWS rows of the dots are Gp rows repeated, and one
    copy is written (the copies are bitwise equal: each row's arithmetic is its own). This
    spares the caller a pad of q and a slice of the output, two kernels a layer.
    quantized: k_ref, v_ref are int8/fp8 codes and refs starts with ks_ref, vs_ref [P, bs] bf16 scales,
    cast to fp32 and applied as the pages are read (8-bit KV: (H + 2) / 2H of bf16's bytes per step).
    """
    ks_ref, vs_ref, o_ref, m_ref, l_ref = refs if quantized else (None, None, *refs)
    split = pl.program_id(2)
    length = length_ref[0]
    first_page = split * pages_per_split
    live_pages = jnp.clip(pl.cdiv(length, page_size) - first_page, 0, pages_per_split)
    keys_per_step = pages_per_step * page_size
    q = q_ref[...]  # [Gp, H], then [R, H]
    rows, head_dim = q.shape
    copies = row_copies(rows)
    q = repeat_rows(q, copies)

    def step(i, carry):
        acc, m, l = carry  # [R, H], [R], [R]
        pages = tables_ref[pl.ds(i * pages_per_step, pages_per_step)]  # [pages_per_step]
        k = k_ref[pages].reshape(keys_per_step, head_dim)  # [keys, H]
        v = v_ref[pages].reshape(keys_per_step, head_dim)
        if quantized:
            k_scale = ks_ref[pages].reshape(keys_per_step).astype(jnp.float32)  # [keys]
            v_scale = vs_ref[pages].reshape(keys_per_step).astype(jnp.float32)
            k = (k.astype(jnp.float32) * k_scale[:, None]).astype(q.dtype)
            v = (v.astype(jnp.float32) * v_scale[:, None]).astype(q.dtype)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * LOG2E)  # [R, keys]
        tokens = (first_page + i * pages_per_step) * page_size + jnp.arange(keys_per_step)
        s = jnp.where((tokens < length)[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])  # [R, keys]
        l = l * correction + jnp.sum(p, axis=1)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:1], MASK_VALUE, jnp.float32),
             jnp.zeros(q.shape[:1], jnp.float32))
    acc, m, l = lax.fori_loop(0, pl.cdiv(live_pages, pages_per_step), step, carry)
    o_ref[...] = one_copy(acc / jnp.where(l > 0, l, 1.0)[:, None], copies).astype(o_ref.dtype)  # empty: zeros, l = 0
    m_ref[...] = one_copy(m, copies)
    l_ref[...] = one_copy(l, copies)


def decode_partials(q, k_pages, v_pages, block_tables, lengths, *, scale: float,
                    blocks: DecodeBlocks, interpret: bool, k_scales=None, v_scales=None):
    """Per-split partial attention.

    Args:
      q: [B, K, Gp, H] (Gp >= 16 or a power of 2); k_pages, v_pages: [P, bs, K, H]; block_tables: [B, splits,
        pages_per_split] int32 (valid page ids everywhere); lengths: [B, 1] int32;
      k_scales, v_scales: None, or [P, bs, K] bf16 scales of int8/fp8 pages.
    Returns:
      o [B, K, splits, Gp, H] and m, l [B, K, splits, Gp] fp32 (base-2 max, denominator). o is
      fp32 for the merge, or q's dtype with one split: then it is the attention's result (and
      m, l, a few bytes a row, go unread).
    Raises:
      ValueError: Gp under 16 and not a power of 2 (its copies would not fill 16 rows).
    """
    b, kv_heads, gp, h = q.shape
    if gp < MIN_DOT_ROWS and gp & (gp - 1):
        raise ValueError(f"q holds {gp} rows a kv head: under {MIN_DOT_ROWS} they must be a power of 2 "
                         f"(pad them with zero rows to {MIN_DOT_ROWS})")
    pool, page_size = k_pages.shape[:2]
    splits = block_tables.shape[1]
    kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size,
                               pages_per_step=blocks.pages_per_step,
                               pages_per_split=blocks.pages_per_split,
                               precision=dot_precision(q.dtype), quantized=k_scales is not None)
    # Grid axes: (sequence bi, kv head ki, split si).
    table_spec = pl.BlockSpec((None, None, blocks.pages_per_split), lambda bi, ki, si: (bi, si, 0))
    length_spec = pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0))
    q_spec = pl.BlockSpec((None, None, gp, h), lambda bi, ki, si: (bi, ki, 0, 0))
    page_spec = pl.BlockSpec((pool, page_size, None, h), lambda bi, ki, si: (0, 0, ki, 0))
    scale_spec = pl.BlockSpec((pool, page_size, None), lambda bi, ki, si: (0, 0, ki))
    scales = () if k_scales is None else (k_scales, v_scales)
    out_spec = pl.BlockSpec((None, None, None, gp, h), lambda bi, ki, si: (bi, ki, si, 0, 0))
    stat_spec = pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0))
    return pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=[table_spec, length_spec, q_spec, page_spec, page_spec] + [scale_spec] * len(scales),
        out_specs=[out_spec, stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, splits, gp, h), q.dtype if splits == 1 else jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(block_tables, lengths, q, k_pages, v_pages, *scales)


def merge_splits(o, m, l):
    """Combine split partials (o [..., splits, Gp, H], m, l [..., splits, Gp]) -> [..., Gp, H]:
    each split's normalized output weighted by its share of the softmax mass."""
    weight = l * jnp.exp2(m - jnp.max(m, axis=-2, keepdims=True))  # [..., splits, Gp]
    total = jnp.sum(weight, axis=-2)  # [..., Gp]; 0 for a sequence of length 0
    out = jnp.sum(weight[..., None] * o, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]
