"""Flash-attention backward in Pallas (Triton lowering): dQ, dK, dV from the saved log-sum-exp.

FlashAttention-2 (arXiv:2307.08691, algorithm 2), split in two kernels so that neither needs
atomics nor equal block counts for T and S:
  dK/dV kernel: one program per (kv block, batch, kv head); keeps dK, dV [block_kv, H] in fp32
    and loops over the query heads of its GQA group and their query blocks, so the group sum
    happens in registers (no per-query-head dK/dV buffers).
  dQ kernel: one program per (query block, batch, query head); loops over kv blocks.
Both recompute P = exp2(s - lse2) from the forward's base-2 lse; delta = rowsum(dO * O) comes
from one einsum outside. With s = scale * q k^T, dS = P * (dO V^T - delta):
dV = P^T dO, dK = scale * dS^T Q, dQ = scale * dS K.

B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.config import BlockSizes
from pallas_kernels._triton import dot_precision
from pallas_kernels.flash_attention.triton_fwd import (LOG2E, cdiv, kv_block_ranges, load_rows, store_rows,
                                                       tile_mask)


def _probs_and_dscores(q, k, v, do, lse2, delta, *, qk_scale, mask, precision):
    """P [rows, cols] (zero where `mask` is False) and dS = P * (dO V^T - delta)."""
    s = plgpu.dot(q, k, trans_b=True, precision=precision) * qk_scale  # [rows, cols]
    p = jnp.exp2(s - lse2[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # select, not multiply: masked s may be inf or NaN
    dp = plgpu.dot(do, v, trans_b=True, precision=precision)  # [rows, cols]
    return p, p * (dp - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_kv_ref, dq_ref, *,
               scale, causal, seq_q, seq_kv, block_q, block_kv, precision):
    """One (query block, batch, head) program.

    q_ref, do_ref [block_q, H]; k_ref, v_ref [S, H]; lse_ref, delta_ref [block_q] fp32;
    seg_q_ref [block_q] and seg_kv_ref [S] int32, or None; dq_ref [block_q, H].
    """
    segmented = seg_q_ref is not None
    q_start = pl.program_id(0) * block_q
    rows = q_start + jnp.arange(block_q)  # [block_q]
    row_valid = (rows < seq_q) if seq_q % block_q else None
    q = load_rows(q_ref, row_valid)  # [block_q, H]
    do = load_rows(do_ref, row_valid)  # [block_q, H]
    lse2 = load_rows(lse_ref, row_valid)  # [block_q]
    delta = load_rows(delta_ref, row_valid)  # [block_q]
    seg_rows = load_rows(seg_q_ref, row_valid) if segmented else None

    def step(j, dq, masked):
        kv_start = j * block_kv
        cols = kv_start + jnp.arange(block_kv)  # [block_kv]
        col_valid = (cols < seq_kv) if masked else None
        k = load_rows(k_ref.at[pl.ds(kv_start, block_kv)], col_valid)  # [block_kv, H]
        v = load_rows(v_ref.at[pl.ds(kv_start, block_kv)], col_valid)  # [block_kv, H]
        mask = None
        if masked:
            seg_cols = (load_rows(seg_kv_ref.at[pl.ds(kv_start, block_kv)], col_valid)
                        if segmented else None)
            mask = tile_mask(rows, cols, seq_q=seq_q, seq_kv=seq_kv, causal=causal,
                             seg_rows=seg_rows, seg_cols=seg_cols)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, qk_scale=scale * LOG2E, mask=mask,
                                   precision=precision)
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)  # [block_q, H]

    first_masked, end = kv_block_ranges(q_start, block_q, block_kv, seq_kv=seq_kv, causal=causal,
                                        segmented=segmented)
    dq = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
    dq = lax.fori_loop(0, first_masked, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(first_masked, end, functools.partial(step, masked=True), dq)
    store_rows(dq_ref, (dq * scale).astype(dq_ref.dtype), row_valid)


def _q_block_ranges(kv_start, block_q, block_kv, *, seq_q, causal, segmented):
    """For key rows [kv_start, kv_start + block_kv): q-block ranges (masked, unmasked, masked).

    Causal: query blocks wholly above the diagonal are skipped; those crossing it come first
    (masked), then the fully visible ones (unmasked), then the ragged last block (masked).
    """
    n_q = pl.cdiv(seq_q, block_q)
    n_full = 0 if segmented else seq_q // block_q
    if causal:
        first = lax.div(kv_start, block_q)
        visible = cdiv(kv_start + block_kv - 1, block_q)  # first block with every row >= every key
    else:
        first, visible = 0, 0
    diag_end = jnp.minimum(visible, n_q)
    tail_start = jnp.maximum(diag_end, n_full)
    return (first, diag_end), (diag_end, tail_start), (tail_start, n_q)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_kv_ref, dk_ref,
                 dv_ref, *, scale, causal, seq_q, seq_kv, block_q, block_kv, group, precision):
    """One (kv block, batch, kv head) program, summing over the G query heads of its group.

    q_ref, do_ref [T, G, H]; k_ref, v_ref [block_kv, H]; lse_ref, delta_ref [G, T] fp32;
    seg_q_ref [T] and seg_kv_ref [block_kv] int32, or None; dk_ref, dv_ref [block_kv, H].

    Works on transposed tiles, key rows first (as Triton's fused-attention tutorial): S^T = K Q^T,
    so every dot has M = block_kv (wgmma wants M a multiple of 64; a 32-row query block as M
    does not qualify) and P^T, dS^T feed dV += P^T dO and dK += dS^T Q without transposing a
    register tile (a layout shuffle through shared memory at every step).
    """
    segmented = seg_q_ref is not None
    kv_start = pl.program_id(0) * block_kv
    cols = kv_start + jnp.arange(block_kv)  # [block_kv] key positions
    col_valid = (cols < seq_kv) if seq_kv % block_kv else None
    k = load_rows(k_ref, col_valid)  # [block_kv, H]
    v = load_rows(v_ref, col_valid)  # [block_kv, H]
    seg_cols = load_rows(seg_kv_ref, col_valid) if segmented else None
    qk_scale = scale * LOG2E

    def step(i, carry, head, masked):
        dk, dv = carry  # [block_kv, H] each, fp32
        q_start = i * block_q
        rows = q_start + jnp.arange(block_q)  # [block_q] query positions
        row_valid = (rows < seq_q) if masked else None
        rows_at = pl.ds(q_start, block_q)
        q = load_rows(q_ref.at[rows_at, head], row_valid)  # [block_q, H]
        do = load_rows(do_ref.at[rows_at, head], row_valid)  # [block_q, H]
        lse2 = load_rows(lse_ref.at[head, rows_at], row_valid)  # [block_q]
        delta = load_rows(delta_ref.at[head, rows_at], row_valid)  # [block_q]
        s_t = plgpu.dot(k, q, trans_b=True, precision=precision) * qk_scale  # [block_kv, block_q]
        p_t = jnp.exp2(s_t - lse2[None, :])
        if masked:
            seg_rows = load_rows(seg_q_ref.at[rows_at], row_valid) if segmented else None
            ok = tile_mask(rows, cols, seq_q=seq_q, seq_kv=seq_kv, causal=causal,
                           seg_rows=seg_rows, seg_cols=seg_cols, kv_major=True)
            p_t = jnp.where(ok, p_t, 0.0)  # select, not multiply: masked s may be inf or NaN
        dp_t = plgpu.dot(v, do, trans_b=True, precision=precision)  # [block_kv, block_q]
        ds_t = p_t * (dp_t - delta[None, :])
        dv = dv + plgpu.dot(p_t.astype(do.dtype), do, precision=precision)
        dk = dk + plgpu.dot(ds_t.astype(q.dtype), q, precision=precision)
        return dk, dv

    ranges = _q_block_ranges(kv_start, block_q, block_kv, seq_q=seq_q, causal=causal,
                             segmented=segmented)

    def head_step(head, carry):  # one query head of the GQA group
        for (lo, hi), masked in zip(ranges, (True, False, True)):
            carry = lax.fori_loop(lo, hi, functools.partial(step, head=head, masked=masked), carry)
        return carry

    zeros = jnp.zeros((block_kv, k.shape[-1]), jnp.float32)
    if group == 1:  # MHA: no loop over heads around the q-block loops
        dk, dv = head_step(jnp.asarray(0, jnp.int32), (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, group, head_step, (zeros, zeros))
    store_rows(dk_ref, (dk * scale).astype(dk_ref.dtype), col_valid)
    store_rows(dv_ref, dv.astype(dv_ref.dtype), col_valid)


def flash_backward(q, k, v, segment_ids, out, lse2, dout, *, scale: float, causal: bool,
                   blocks: BlockSizes, interpret: bool):
    """Gradients (dq, dk, dv) in the dtypes of q, k, v; lse2 [B, N, T] is the forward's base-2 lse."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n // kv_heads
    segmented = segment_ids is not None
    # delta = rowsum(dO * O) [B, N, T]: a multiply and a reduction (as an einsum it is a batched
    # dot with M = N = 1, which XLA may send to a GEMM and autotune).
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    common = dict(scale=scale, causal=causal, seq_q=t, seq_kv=s, precision=dot_precision(q.dtype))
    params = plgpu.CompilerParams(num_warps=blocks.num_warps_bwd, num_stages=blocks.num_stages_bwd)

    bq, bkv = blocks.block_q_dq, blocks.block_kv_dq
    q_spec = pl.BlockSpec((None, bq, None, h), lambda i, bi, hi: (bi, i, hi, 0))
    kv_spec = pl.BlockSpec((None, s, None, h), lambda i, bi, hi: (bi, 0, lax.div(hi, group), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    seg_specs = [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
                 pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))] if segmented else [None, None]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=bq, block_kv=bkv, **common),
        grid=(pl.cdiv(t, bq), b, n),  # (query block i, batch bi, query head hi)
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, dout, lse2, delta, segment_ids, segment_ids)

    bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
    # A program sees the G query heads of its kv head: q, dO [T, G, H] and lse, delta [G, T].
    q_spec = pl.BlockSpec((None, t, group, h), lambda j, bi, ki: (bi, 0, ki, 0))
    row_spec = pl.BlockSpec((None, group, t), lambda j, bi, ki: (bi, ki, 0))
    kv_spec = pl.BlockSpec((None, bkv, None, h), lambda j, bi, ki: (bi, j, ki, 0))
    seg_specs = [pl.BlockSpec((None, t), lambda j, bi, ki: (bi, 0)),
                 pl.BlockSpec((None, bkv), lambda j, bi, ki: (bi, j))] if segmented else [None, None]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=bq, block_kv=bkv, group=group, **common),
        grid=(pl.cdiv(s, bkv), b, kv_heads),  # (kv block j, batch bi, kv head ki)
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkdv",
    )(q, k, v, dout, lse2, delta, segment_ids, segment_ids)
    return dq, dk, dv
