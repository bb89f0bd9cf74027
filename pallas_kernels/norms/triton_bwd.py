"""Backward RMSNorm / LayerNorm kernel (Pallas, Triton lowering): dx per row, dweight/dbias partial sums.

With xhat = (s - mean) * rstd (mean = 0 for RMSNorm) and g = dy * weight, per row:
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: no mean(g) term)
  dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy.
The grid is persistent: program p handles row tiles p, p + P, p + 2P, ... and accumulates its
dweight/dbias in fp32 registers, then writes one row of a [P, block_hidden] partial buffer that
api.py sums with jnp. No two programs write the same address, so there are no atomics and no races
(the Triton layer-norm tutorial uses locks here; Liger-Kernel's RMSNorm uses the same per-program
partials). The cotangent of the new residual, when the forward fused the add, is added to dx.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.norms import config as norm_config


def _backward_kernel(*refs, subtract_mean, has_sum_grad, has_bias, n_rows, hidden, block_rows,
                     num_programs, steps):
    """Refs, in order (optional ones present only when their flag is set):
      s_ref (normalized input), dy_ref, dsum_ref?: [rows, hidden], whole arrays
      weight_ref: [hidden]; mean_ref?, rstd_ref: [rows] fp32
      dx_ref: [rows, hidden]; dweight_ref, dbias_ref?: [block_hidden] fp32 (this program's row)
    """
    refs = list(refs)
    s_ref, dy_ref = refs.pop(0), refs.pop(0)
    dsum_ref = refs.pop(0) if has_sum_grad else None
    weight_ref = refs.pop(0)
    mean_ref = refs.pop(0) if subtract_mean else None
    rstd_ref, dx_ref, dweight_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    dbias_ref = refs.pop(0) if has_bias else None
    assert not refs

    width = dweight_ref.shape[0]
    program = pl.program_id(0)
    cols = pl.ds(0, width)
    col_ok = jnp.arange(width) < hidden  # [block_hidden]
    weight = plgpu.load(weight_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)

    def step(k, carry):
        dweight, dbias = carry
        # Tiles past the last row (k beyond this program's share) are fully masked: no memory access.
        start = (program + k * num_programs) * block_rows
        row_ok = start + jnp.arange(block_rows) < n_rows  # [block_rows]
        mask = row_ok[:, None] & col_ok[None, :]
        tile = (pl.ds(start, block_rows), cols)

        def load_tile(ref):  # [block_rows, block_hidden] fp32, 0 where masked
            return plgpu.load(ref.at[tile], mask=mask, other=0.0).astype(jnp.float32)

        def load_rows(ref):  # [block_rows] fp32
            return plgpu.load(ref.at[pl.ds(start, block_rows)], mask=row_ok, other=0.0)

        s, dy = load_tile(s_ref), load_tile(dy_ref)
        rstd = load_rows(rstd_ref)
        if subtract_mean:
            xhat = jnp.where(mask, (s - load_rows(mean_ref)[:, None]) * rstd[:, None], 0.0)
        else:
            xhat = s * rstd[:, None]
        g = dy * weight[None, :]
        dx = g - xhat * (jnp.sum(g * xhat, axis=1) / hidden)[:, None]
        if subtract_mean:
            dx = dx - (jnp.sum(g, axis=1) / hidden)[:, None]
        dx = dx * rstd[:, None]
        if has_sum_grad:
            dx = dx + load_tile(dsum_ref)
        plgpu.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=mask)
        dweight = dweight + jnp.sum(dy * xhat, axis=0)
        if has_bias:
            dbias = dbias + jnp.sum(dy, axis=0)
        return dweight, dbias

    zeros = jnp.zeros((width,), jnp.float32)
    dweight, dbias = lax.fori_loop(0, steps, step, (zeros, zeros))
    dweight_ref[...] = dweight
    if has_bias:
        dbias_ref[...] = dbias


def norm_backward(s, dy, dsum, weight, mean, rstd, *, has_bias, config, interpret):
    """Gradients of y = norm(s) * weight (+ bias) with respect to s, weight and bias.

    Args:
      s: [rows, hidden], the normalized input (x, or x + residual when the add was fused).
      dy: [rows, hidden], cotangent of y. dsum: [rows, hidden] cotangent of x + residual, or None.
      weight: [hidden]. mean: [rows] fp32 (LayerNorm) or None (RMSNorm). rstd: [rows] fp32.
      has_bias: whether to return dbias. config: a NormConfig.
    Returns:
      (ds [rows, hidden] in s.dtype, dweight [hidden] fp32, dbias [hidden] fp32 or None).
    """
    n_rows, hidden = s.shape
    width = norm_config.block_hidden(hidden)
    block_rows = config.block_rows
    num_programs = config.bwd_programs
    steps = pl.cdiv(pl.cdiv(n_rows, block_rows), num_programs)
    subtract_mean = mean is not None
    has_sum_grad = dsum is not None

    whole = pl.no_block_spec
    operands = [s, dy] + ([dsum] if has_sum_grad else []) + [weight]
    operands += ([mean] if subtract_mean else []) + [rstd]
    partial = jax.ShapeDtypeStruct((num_programs, width), jnp.float32)
    # Grid axis 0: persistent programs; each owns one row of the partial-sum buffers.
    partial_spec = pl.BlockSpec((None, width), lambda p: (p, 0))
    out_shape = [jax.ShapeDtypeStruct(s.shape, s.dtype), partial] + ([partial] if has_bias else [])
    out_specs = [whole, partial_spec] + ([partial_spec] if has_bias else [])

    kernel = functools.partial(
        _backward_kernel, subtract_mean=subtract_mean, has_sum_grad=has_sum_grad,
        has_bias=has_bias, n_rows=n_rows, hidden=hidden, block_rows=block_rows,
        num_programs=num_programs, steps=steps)
    outs = pl.pallas_call(
        kernel,
        grid=(num_programs,),
        in_specs=[whole] * len(operands),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.bwd_num_warps),
        interpret=interpret,
        name="layer_norm_bwd" if subtract_mean else "rms_norm_bwd",
    )(*operands)
    ds, dweight_partial = outs[0], outs[1]
    dweight = jnp.sum(dweight_partial, axis=0)[:hidden]
    dbias = jnp.sum(outs[2], axis=0)[:hidden] if has_bias else None
    return ds, dweight, dbias
