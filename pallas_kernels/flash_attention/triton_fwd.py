"""Flash-attention forward in Pallas (Triton lowering); saves the log-sum-exp for the backward.

FlashAttention-2 (Dao 2023, arXiv:2307.08691, algorithm 1): one program per (query block,
batch, query head) keeps its q tile, streams the key/value blocks of its kv head and keeps a
running max `m`, denominator `l` and unnormalized output `acc` (online softmax).

B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
Ragged lengths (T or S not a multiple of the block) are handled inside the kernel: loads and
stores past the end are masked (`other=0`), and logits of keys past S are masked out.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._triton import dot_precision
from pallas_kernels.flash_attention.config import BlockSizes

LOG2E = math.log2(math.e)  # we work in base 2: e^x = 2^(x log2 e), and exp2 is the cheap one.
# Finite, not -inf: a row whose tile is all masked gets exp2(0) = 1 junk that the next real
# maximum wipes (its correction factor underflows to 0), instead of inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def cdiv(a, b: int):
    """Ceiling division for non-negative traced ints (`//` on program ids does not lower)."""
    return lax.div(a + (b - 1), b)


def _row_mask(valid, ndim):
    """Row validity [rows] broadcast over a 1-D or 2-D (rows first) tile."""
    return valid if ndim == 1 else valid[:, None]


def load_rows(ref, valid):
    """Load `ref` (rows first); rows where `valid` [rows] is False read 0 (`valid=None`: all)."""
    if valid is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=_row_mask(valid, len(ref.shape)), other=0)


def store_rows(ref, value, valid):
    """Store `value` into `ref`, skipping rows where `valid` is False (`None`: all)."""
    if valid is None:
        plgpu.store(ref, value)
    else:
        plgpu.store(ref, value, mask=_row_mask(valid, value.ndim))


def tile_mask(rows, cols, *, seq_q, seq_kv, causal, seg_rows=None, seg_cols=None,
              kv_major=False):
    """[rows, cols] bool, True where query `rows[i]` may attend key `cols[j]`;
    `kv_major=True`: the transpose, [cols, rows] (tiles with key rows first)."""
    r, c = (rows[None, :], cols[:, None]) if kv_major else (rows[:, None], cols[None, :])
    ok = (r < seq_q) & (c < seq_kv)
    if causal:
        ok = ok & (r >= c)
    if seg_rows is not None:
        sr, sc = (seg_rows[None, :], seg_cols[:, None]) if kv_major else (seg_rows[:, None],
                                                                            seg_cols[None, :])
        ok = ok & (sr == sc)
    return ok


def kv_block_ranges(q_start, block_q, block_kv, *, seq_kv, causal, segmented):
    """For query rows [q_start, q_start + block_q): (first masked kv block, end of kv blocks).

    Blocks [0, first_masked) need no mask: in bounds and, if causal, wholly at or below the
    diagonal. Blocks past the diagonal are skipped (never loaded) when causal.
    """
    n_full = seq_kv // block_kv
    if causal:
        end = cdiv(jnp.minimum(q_start + block_q, seq_kv), block_kv)
        first_masked = jnp.minimum(lax.div(q_start + 1, block_kv), n_full)
    else:
        end = pl.cdiv(seq_kv, block_kv)
        first_masked = n_full
    return (0 if segmented else first_masked), end


def _fwd_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_kv_ref, o_ref, lse_ref, *, scale, causal,
                seq_q, seq_kv, block_q, block_kv, precision):
    """One (query block, batch, head) program.

    q_ref [block_q, H]; k_ref, v_ref [S, H] (this head's kv head); seg_q_ref [block_q] and
    seg_kv_ref [S] int32, or None without segments; o_ref [block_q, H]; lse_ref [block_q] fp32.
    """
    segmented = seg_q_ref is not None
    q_start = pl.program_id(0) * block_q
    rows = q_start + jnp.arange(block_q)  # [block_q]
    row_valid = (rows < seq_q) if seq_q % block_q else None
    q = load_rows(q_ref, row_valid)  # [block_q, H]
    seg_rows = load_rows(seg_q_ref, row_valid) if segmented else None
    qk_scale = scale * LOG2E

    def step(j, carry, masked):
        acc, m, l = carry  # [block_q, H], [block_q], [block_q]
        kv_start = j * block_kv
        cols = kv_start + jnp.arange(block_kv)  # [block_kv]
        col_valid = (cols < seq_kv) if masked else None
        k = load_rows(k_ref.at[pl.ds(kv_start, block_kv)], col_valid)  # [block_kv, H]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale  # [block_q, block_kv]
        if masked:
            seg_cols = (load_rows(seg_kv_ref.at[pl.ds(kv_start, block_kv)], col_valid)
                        if segmented else None)
            ok = tile_mask(rows, cols, seq_q=seq_q, seq_kv=seq_kv, causal=causal,
                           seg_rows=seg_rows, seg_cols=seg_cols)
            s = jnp.where(ok, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        correction = jnp.exp2(m - m_new)  # rescales what was summed under the old max
        p = jnp.exp2(s - m_new[:, None])  # [block_q, block_kv]
        l = l * correction + jnp.sum(p, axis=1)
        v = load_rows(v_ref.at[pl.ds(kv_start, block_kv)], col_valid)  # [block_kv, H]
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return acc, m_new, l

    carry = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
             jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    first_masked, end = kv_block_ranges(q_start, block_q, block_kv, seq_kv=seq_kv,
                                        causal=causal, segmented=segmented)
    carry = lax.fori_loop(0, first_masked, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(first_masked, end, functools.partial(step, masked=True), carry)
    # Normalize once at the end (FlashAttention-2 section 3.1.1), not at every step.
    store_rows(o_ref, (acc / l[:, None]).astype(o_ref.dtype), row_valid)
    store_rows(lse_ref, m + jnp.log2(l), row_valid)  # base-2 log-sum-exp of scale * q k^T


def flash_forward(q, k, v, segment_ids, *, scale: float, causal: bool, blocks: BlockSizes,
                  interpret: bool):
    """Forward pass. Returns out [B, T, N, H] (q's dtype) and lse2 [B, N, T] fp32, in base 2."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n // kv_heads
    bq, bkv = blocks.block_q, blocks.block_kv
    segmented = segment_ids is not None
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, h), lambda i, bi, hi: (bi, 0, lax.div(hi, group), 0))
    seg_specs = [None, None]  # segment ids for the query rows, and for all keys
    if segmented:
        seg_specs = [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                     pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))]
    kernel = functools.partial(
        _fwd_kernel, scale=scale, causal=causal, seq_q=t, seq_kv=s, block_q=bq, block_kv=bkv,
        precision=dot_precision(q.dtype))
    out, lse2 = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, bq), b, n),  # (query block i, batch bi, query head hi)
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v, segment_ids, segment_ids)
    return out, lse2
