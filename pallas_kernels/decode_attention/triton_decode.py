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

# The in-kernel merge holds every split's partial [Sp, Gp, H] fp32 in one program's registers:
# past this many a thread it would spill, and the merge runs after the kernel instead.
MAX_MERGE_VALUES_PER_THREAD = 128
LOG2E = math.log2(math.e)  # base 2 throughout: exp2 is the cheap exponential
# Finite, not -inf: a fully masked step gives junk that the next real maximum wipes out.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _decode_kernel(tables_ref, length_ref, q_ref, k_ref, v_ref, *refs, scale,
                   page_size, pages_per_step, pages_per_split, precision, quantized, splits, merge_in_kernel,
                   interpret):
    """One (sequence, kv head, split) program.

    tables_ref [pages_per_split] int32 (this split's page ids); length_ref [1] int32;
    q_ref [Gp, H]; k_ref, v_ref [P, bs, H] (this kv head); o_ref [Gp, H] (fp32, or q's dtype
    with one split; normalized within the split); m_ref, l_ref [Gp] fp32: base-2 running max and softmax denominator.
    Gp < MIN_DOT_ROWS (a power of 2): the R = MIN_DOT_ROWS rows of the dots are Gp rows repeated, and one
    copy is written (the copies are bitwise equal: each row's arithmetic is its own). This
    spares the caller a pad of q and a slice of the output, two kernels a layer.
    quantized: k_ref, v_ref are int8/fp8 codes and refs starts with ks_ref, vs_ref [P, bs] bf16 scales,
    cast to fp32 and applied as the pages are read (8-bit KV: (H + 2) / 2H of bf16's bytes per step).
    merge_in_kernel: refs end with count_in_ref (aliased to count_ref), o_ref, m_ref, l_ref
    spanning Sp = next power of 2 of `splits` (this program writes its split's row), out_ref
    [Gp, H] in q's dtype and count_ref [1] int32 (zero on entry and on exit). Every program
    holds the merge's registers, though only the last to arrive runs it.
    interpret: Pallas interpret mode, which runs the programs one after another (so the last
    split always arrives last) and has no barrier to lower.
    """
    refs = list(refs)
    ks_ref, vs_ref = (refs.pop(0), refs.pop(0)) if quantized else (None, None)
    if merge_in_kernel:
        _, o_ref, m_ref, l_ref, out_ref, count_ref = refs
    else:
        o_ref, m_ref, l_ref = refs
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
    o = one_copy(acc / jnp.where(l > 0, l, 1.0)[:, None], copies).astype(o_ref.dtype)  # empty: zeros, l = 0
    m, l = one_copy(m, copies), one_copy(l, copies)
    if not merge_in_kernel:
        o_ref[...], m_ref[...], l_ref[...] = o, m, l
        return
    o_ref[split], m_ref[split], l_ref[split] = o, m, l
    # Every thread's partial is stored before the count's release: `debug_barrier` is a barrier
    # of this program's threads only (bar.sync), which orders their stores before the atomic
    # that one thread then runs, acquire-release at GPU scope (cumulative over the stores the
    # barrier ordered). So the program that counts last sees every split's partial; it reads
    # them volatile, past L1, which needs no acquire of its own to be current.
    if not interpret:
        plgpu.debug_barrier()
    arrived = plgpu.atomic_add(count_ref, jnp.int32(0), jnp.int32(1))

    @pl.when(arrived == splits - 1)
    def _():
        live = jnp.arange(o_ref.shape[0]) < splits  # the rows past `splits` were never written
        read = lambda ref, other: plgpu.load(  # noqa: E731
            ref, mask=jnp.broadcast_to(live.reshape(-1, *(1,) * (len(ref.shape) - 1)), ref.shape),
            other=other, volatile=True)
        out_ref[...] = merge_splits(read(o_ref, 0.0), read(m_ref, MASK_VALUE), read(l_ref, 0.0)).astype(out_ref.dtype)
        count_ref[0] = jnp.int32(0)


def merges_in_kernel(splits: int, rows: int, head_dim: int, num_warps: int) -> bool:
    """Whether the kernel, given arrival counts, merges its splits itself: more than one split,
    and every split's partial [Sp, rows, head_dim] fp32 fits MAX_MERGE_VALUES_PER_THREAD a thread."""
    values = pl.next_power_of_2(splits) * rows * head_dim
    return splits > 1 and values <= MAX_MERGE_VALUES_PER_THREAD * 32 * num_warps


def decode_partials(q, k_pages, v_pages, block_tables, lengths, *, scale: float,
                    blocks: DecodeBlocks, interpret: bool, k_scales=None, v_scales=None, split_counts=None):
    """Per-split partial attention, or with split_counts the merged attention.

    Args:
      q: [B, K, Gp, H] (Gp >= 16 or a power of 2); k_pages, v_pages: [P, bs, K, H]; block_tables: [B, splits,
        pages_per_split] int32 (valid page ids everywhere); lengths: [B, 1] int32;
      k_scales, v_scales: None, or [P, bs, K] bf16 scales of int8/fp8 pages.
    Returns:
      o [B, K, splits, Gp, H] and m, l [B, K, splits, Gp] fp32 (base-2 max, denominator). o is
      fp32 for the merge, or q's dtype with one split: then it is the attention's result (and
      m, l, a few bytes a row, go unread).
      With split_counts ([B, K] int32, zeros) where `merges_in_kernel`: (out [B, K, Gp, H] in
      q's dtype, merged by the last split program of each (sequence, kv head); split_counts,
      zeros again: the same buffer, updated in place).
    Raises:
      ValueError: Gp under 16 and not a power of 2 (its copies would not fill 16 rows).
    """
    b, kv_heads, gp, h = q.shape
    if gp < MIN_DOT_ROWS and gp & (gp - 1):
        raise ValueError(f"q holds {gp} rows a kv head: under {MIN_DOT_ROWS} they must be a power of 2 "
                         f"(pad them with zero rows to {MIN_DOT_ROWS})")
    pool, page_size = k_pages.shape[:2]
    splits = block_tables.shape[1]
    merge_in_kernel = split_counts is not None and merges_in_kernel(splits, gp, h, blocks.num_warps)
    kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size,
                               pages_per_step=blocks.pages_per_step,
                               pages_per_split=blocks.pages_per_split,
                               precision=dot_precision(q.dtype), quantized=k_scales is not None,
                               splits=splits, merge_in_kernel=merge_in_kernel, interpret=interpret)
    # Grid axes: (sequence bi, kv head ki, split si).
    table_spec = pl.BlockSpec((None, None, blocks.pages_per_split), lambda bi, ki, si: (bi, si, 0))
    length_spec = pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0))
    q_spec = pl.BlockSpec((None, None, gp, h), lambda bi, ki, si: (bi, ki, 0, 0))
    page_spec = pl.BlockSpec((pool, page_size, None, h), lambda bi, ki, si: (0, 0, ki, 0))
    scale_spec = pl.BlockSpec((pool, page_size, None), lambda bi, ki, si: (0, 0, ki))
    scales = () if k_scales is None else (k_scales, v_scales)
    in_specs = [table_spec, length_spec, q_spec, page_spec, page_spec] + [scale_spec] * len(scales)
    if merge_in_kernel:  # each program sees every split's row of the partials (Sp: a power of 2)
        parts = pl.next_power_of_2(splits)
        count_spec = pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, ki))
        in_specs.append(count_spec)
        out_specs = [pl.BlockSpec((None, None, parts, gp, h), lambda bi, ki, si: (bi, ki, 0, 0, 0)),
                     pl.BlockSpec((None, None, parts, gp), lambda bi, ki, si: (bi, ki, 0, 0)),
                     pl.BlockSpec((None, None, parts, gp), lambda bi, ki, si: (bi, ki, 0, 0)),
                     pl.BlockSpec((None, None, gp, h), lambda bi, ki, si: (bi, ki, 0, 0)), count_spec]
        out_shape = [jax.ShapeDtypeStruct((b, kv_heads, parts, gp, h), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, parts, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, parts, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, gp, h), q.dtype),
                     jax.ShapeDtypeStruct((b, kv_heads), jnp.int32)]
        operands, aliases = (split_counts,), {len(in_specs) - 1: 4}
    else:
        out_spec = pl.BlockSpec((None, None, None, gp, h), lambda bi, ki, si: (bi, ki, si, 0, 0))
        stat_spec = pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0))
        out_specs = [out_spec, stat_spec, stat_spec]
        out_shape = [jax.ShapeDtypeStruct((b, kv_heads, splits, gp, h), q.dtype if splits == 1 else jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32),
                     jax.ShapeDtypeStruct((b, kv_heads, splits, gp), jnp.float32)]
        operands, aliases = (), {}
    outs = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(block_tables, lengths, q, k_pages, v_pages, *scales, *operands)
    return tuple(outs[3:]) if merge_in_kernel else tuple(outs)


def merge_splits(o, m, l):
    """Combine split partials (o [..., splits, Gp, H], m, l [..., splits, Gp]) -> [..., Gp, H]:
    each split's normalized output weighted by its share of the softmax mass."""
    weight = l * jnp.exp2(m - jnp.max(m, axis=-2, keepdims=True))  # [..., splits, Gp]
    total = jnp.sum(weight, axis=-2)  # [..., Gp]; 0 for a sequence of length 0
    out = jnp.sum(weight[..., None] * o, axis=-3)
    return out / jnp.where(total > 0, total, 1.0)[..., None]
