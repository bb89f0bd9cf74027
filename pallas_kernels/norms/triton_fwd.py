"""Forward RMSNorm / LayerNorm kernel (Pallas, Triton lowering), optionally fused with the residual add.

One program normalizes a [block_rows, block_hidden] tile: the whole row sits in registers, so x is read
once and y written once (plus the fp32 per-row statistics the backward needs). Statistics are fp32
whatever the input dtype. Columns past hidden and rows past n_rows are masked (loads give 0).
Layout follows jax/experimental/pallas/ops/gpu/layer_norm.py, but with row tiles and a grid over rows
instead of one vmapped program per row.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.norms import config as norm_config


def _forward_kernel(*refs, subtract_mean, has_residual, has_bias, n_rows, hidden, eps):
    """Refs, in order (optional ones present only when their flag is set):
      x_ref, residual_ref?: [block_rows, block_hidden]; weight_ref, bias_ref?: [block_hidden]
      y_ref, sum_ref? (x + residual): [block_rows, block_hidden]
      mean_ref? (subtract_mean), rstd_ref: [block_rows] fp32
    """
    refs = list(refs)
    x_ref = refs.pop(0)
    residual_ref = refs.pop(0) if has_residual else None
    weight_ref = refs.pop(0)
    bias_ref = refs.pop(0) if has_bias else None
    y_ref = refs.pop(0)
    sum_ref = refs.pop(0) if has_residual else None
    mean_ref = refs.pop(0) if subtract_mean else None
    (rstd_ref,) = refs

    block_rows, width = x_ref.shape
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    row_ok = rows < n_rows  # [block_rows]
    col_ok = jnp.arange(width) < hidden  # [block_hidden]
    mask = row_ok[:, None] & col_ok[None, :]

    s = plgpu.load(x_ref, mask=mask, other=0.0).astype(jnp.float32)  # [block_rows, block_hidden]
    if has_residual:
        s = s + plgpu.load(residual_ref, mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(sum_ref, s.astype(sum_ref.dtype), mask=mask)
    if subtract_mean:
        mean = jnp.sum(s, axis=1) / hidden  # [block_rows]
        # Re-mask: padded columns would otherwise contribute (0 - mean)^2 to the variance.
        s = jnp.where(mask, s - mean[:, None], 0.0)
        plgpu.store(mean_ref, mean, mask=row_ok)
    rstd = lax.rsqrt(jnp.sum(s * s, axis=1) / hidden + eps)  # [block_rows]
    weight = plgpu.load(weight_ref, mask=col_ok, other=0.0).astype(jnp.float32)
    y = s * rstd[:, None] * weight[None, :]
    if has_bias:
        y = y + plgpu.load(bias_ref, mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=mask)
    plgpu.store(rstd_ref, rstd, mask=row_ok)


def norm_forward(x, residual, weight, bias, *, subtract_mean, eps, config, interpret):
    """Normalize the rows of x (+ residual).

    Args:
      x, residual: [rows, hidden], same dtype; residual may be None.
      weight, bias: [hidden]; bias may be None.
      subtract_mean: True for LayerNorm, False for RMSNorm.
      config: a NormConfig.
    Returns:
      (y [rows, hidden] x.dtype, x + residual [rows, hidden] x.dtype or None,
       mean [rows] fp32 or None, rstd [rows] fp32).
    """
    n_rows, hidden = x.shape
    width = norm_config.block_hidden(hidden)
    block_rows = config.block_rows
    # Grid axis 0: row tiles of block_rows rows.
    tile = pl.BlockSpec((block_rows, width), lambda i: (i, 0))
    vector = pl.BlockSpec((width,), lambda i: (0,))
    per_row = pl.BlockSpec((block_rows,), lambda i: (i,))
    has_residual, has_bias = residual is not None, bias is not None

    operands = [x] + ([residual] if has_residual else []) + [weight] + ([bias] if has_bias else [])
    in_specs = [tile] + ([tile] if has_residual else []) + [vector] + ([vector] if has_bias else [])
    rows_out = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    out_specs = [tile]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
        out_specs.append(tile)
    if subtract_mean:
        out_shape.append(rows_out)
        out_specs.append(per_row)
    out_shape.append(rows_out)
    out_specs.append(per_row)

    kernel = functools.partial(
        _forward_kernel, subtract_mean=subtract_mean, has_residual=has_residual,
        has_bias=has_bias, n_rows=n_rows, hidden=hidden, eps=eps)
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_rows, block_rows),),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="layer_norm_fwd" if subtract_mean else "rms_norm_fwd",
    )(*operands)
    outs = list(outs)
    y = outs.pop(0)
    new_residual = outs.pop(0) if has_residual else None
    mean = outs.pop(0) if subtract_mean else None
    (rstd,) = outs
    return y, new_residual, mean, rstd
