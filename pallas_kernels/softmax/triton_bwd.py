"""Backward row softmax (Pallas, Triton lowering): dx = y * (dy - sum(dy * y)), fp32 math.

Same tiling as triton_fwd.py: a row that fits one tile is read once; a longer row takes one pass for
sum(dy * y) and a second to write dx. Rows of zeros (all -inf inputs) get dx = 0.
"""
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.softmax.triton_fwd import row_tile_call, row_tile_loader


def _backward_kernel(y_ref, dy_ref, dx_ref, *, n_rows, n_cols, block_rows, block_cols):
    """y_ref, dy_ref, dx_ref: [rows, n_cols] whole arrays; masked entries load as 0."""
    shape = dict(n_rows=n_rows, n_cols=n_cols, block_rows=block_rows, block_cols=block_cols, other=0.0)
    load_y, load_dy = row_tile_loader(y_ref, **shape), row_tile_loader(dy_ref, **shape)
    n_chunks = pl.cdiv(n_cols, block_cols)

    def tiles(k):
        y, mask, index = load_y(k * block_cols)
        dy, _, _ = load_dy(k * block_cols)
        return y, dy, mask, index  # [block_rows, block_cols] each

    if n_chunks == 1:
        y, dy, mask, index = tiles(0)
        dx = y * (dy - jnp.sum(dy * y, axis=1)[:, None])
        plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=mask)
        return

    def accumulate(k, dot):  # pass 1: per-row sum(dy * y)
        y, dy, _, _ = tiles(k)
        return dot + jnp.sum(dy * y, axis=1)

    dot = lax.fori_loop(0, n_chunks, accumulate, jnp.zeros((block_rows,), jnp.float32))

    def write(k, carry):  # pass 2
        y, dy, mask, index = tiles(k)
        plgpu.store(dx_ref.at[index], (y * (dy - dot[:, None])).astype(dx_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(0, n_chunks, write, 0)


def softmax_backward(y, dy, *, config, interpret):
    """y: [rows, n_cols] softmax output; dy: its cotangent. Returns dx [rows, n_cols] in y.dtype."""
    return row_tile_call(_backward_kernel, y, dy, config=config, interpret=interpret,
                         name="softmax_bwd")
