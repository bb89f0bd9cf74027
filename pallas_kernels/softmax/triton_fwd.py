"""Forward row softmax (Pallas, Triton lowering), fp32 math, safe for -inf and all -inf rows.

A program owns block_rows rows. When a row fits one tile (block_cols >= n_cols) it is read once and
normalized in registers. Otherwise the online softmax of Milakov & Gimelshein 2018 (section 3): one pass
keeps a running max m and a running sum l rescaled by exp(m_old - m_new), a second pass writes
exp(x - m) / l. The max used in exp is replaced by 0 while it is still -inf, so an all -inf row never
forms (-inf) - (-inf) and ends with l = 0, written as zeros. Grid layout as in
jax/experimental/pallas/ops/gpu/softmax.py, with row tiles instead of one vmapped program per row.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def finite_or_zero(m):
    """m with -inf (a running max that has seen nothing yet) replaced by 0: a shift that never
    forms -inf - -inf."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def row_tile_loader(ref, *, n_rows, n_cols, block_rows, block_cols, other):
    """load(c0) -> ([block_rows, block_cols] fp32 tile of this program's rows at column c0, its mask)."""
    start = pl.program_id(0) * block_rows
    row_ok = start + jnp.arange(block_rows) < n_rows

    def load(c0):
        col_ok = c0 + jnp.arange(block_cols) < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        index = (pl.ds(start, block_rows), pl.ds(c0, block_cols))
        return plgpu.load(ref.at[index], mask=mask, other=other).astype(jnp.float32), mask, index
    return load


def _forward_kernel(x_ref, y_ref, *, n_rows, n_cols, block_rows, block_cols):
    """x_ref, y_ref: [rows, n_cols] whole arrays; this program owns block_rows rows from
    pl.program_id(0) * block_rows, loaded as [block_rows, block_cols] tiles."""
    load = row_tile_loader(x_ref, n_rows=n_rows, n_cols=n_cols, block_rows=block_rows,
                           block_cols=block_cols, other=-jnp.inf)
    n_chunks = pl.cdiv(n_cols, block_cols)
    if n_chunks == 1:
        x, mask, index = load(0)  # [block_rows, block_cols]; masked entries are -inf
        e = jnp.exp(x - finite_or_zero(jnp.max(x, axis=1))[:, None])
        total = jnp.sum(e, axis=1)  # [block_rows]
        y = e / jnp.where(total > 0, total, 1.0)[:, None]
        plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)
        return

    def accumulate(k, carry):  # pass 1: running max m and running sum l, per row
        m, total = carry
        x, _, _ = load(k * block_cols)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        shift = finite_or_zero(m_new)
        total = total * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
        return m_new, total

    init = (jnp.full((block_rows,), -jnp.inf, jnp.float32), jnp.zeros((block_rows,), jnp.float32))
    m, total = lax.fori_loop(0, n_chunks, accumulate, init)
    shift = finite_or_zero(m)
    inv_total = 1.0 / jnp.where(total > 0, total, 1.0)

    def write(k, carry):  # pass 2: normalized values
        x, mask, index = load(k * block_cols)
        y = jnp.exp(x - shift[:, None]) * inv_total[:, None]
        plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(0, n_chunks, write, 0)


def row_tile_call(kernel, *arrays, config, interpret, name):
    """pallas_call of `kernel` on [rows, n_cols] whole arrays, one program per block_rows rows.

    The kernel gets the refs of `arrays` and of one output of arrays[0]'s shape and dtype, and the
    keywords n_rows, n_cols, block_rows, block_cols. Returns that output.
    """
    n_rows, n_cols = arrays[0].shape
    kernel = functools.partial(kernel, n_rows=n_rows, n_cols=n_cols,
                               block_rows=config.block_rows, block_cols=config.block_cols)
    # Grid axis 0: row tiles of block_rows rows.
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_rows, config.block_rows),),
        in_specs=[pl.no_block_spec] * len(arrays),
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name=name,
    )(*arrays)


def softmax_forward(x, *, config, interpret):
    """x: [rows, n_cols] float. Returns softmax over the last axis, [rows, n_cols] in x.dtype."""
    return row_tile_call(_forward_kernel, x, config=config, interpret=interpret, name="softmax_fwd")
