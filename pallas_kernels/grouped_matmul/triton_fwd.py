"""Grouped matmul over the padded layout in Pallas (Triton lowering; CPU: interpret mode).

Y[P, N] = X[P, K] @ W[group of the row tile][K, N]: every row tile holds rows of one group
(layout.py), so each program is a tile of a plain matmul whose weight tile is read at the
group id the tile carries (MegaBlocks' block-sparse view, Gale et al. 2022, with one block row
per tile). Spare tiles (group G) write zeros without reading W. With transpose_w the weight is
[G, N, K] and tiles are multiplied transposed: dX = dY @ W[g]^T runs with no copy of W.
Programs walk the tiles in the Triton tutorial's grouped order (matmul/triton_matmul.py).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.matmul.config import TritonBlocks
from pallas_kernels._triton import dot_precision
from pallas_kernels.matmul.triton_matmul import grouped_tile


def _kernel(tile_group_ref, x_ref, w_ref, y_ref, *, n_groups, block_k, transpose_w, precision,
            m_tiles, n_tiles, group_m):
    """tile_group_ref [T] int32; x_ref [block_m, K]; w_ref [G, K, N] ([G, N, K] transposed),
    all of it (the tile's group picks the slice); y_ref [block_m, block_n]."""
    tile_row, tile_col = grouped_tile(pl.program_id(0), m_tiles, n_tiles, group_m)
    group = tile_group_ref[tile_row]
    block_m, block_n = y_ref.shape
    col = pl.ds(tile_col * block_n, block_n)

    @pl.when(group < n_groups)
    def _():
        def step(i, acc):  # acc [block_m, block_n] fp32
            depth = pl.ds(i * block_k, block_k)
            x = x_ref[:, depth]  # [block_m, block_k]
            if transpose_w:
                w = w_ref[group, col, depth]  # [block_n, block_k]
            else:
                w = w_ref[group, depth, col]  # [block_k, block_n]
            return acc + pltriton.dot(x, w, trans_b=transpose_w, precision=precision)

        acc = lax.fori_loop(0, x_ref.shape[1] // block_k, step,
                            jnp.zeros((block_m, block_n), jnp.float32))
        y_ref[...] = acc.astype(y_ref.dtype)

    @pl.when(group >= n_groups)
    def _():
        y_ref[...] = jnp.zeros((block_m, block_n), y_ref.dtype)


def grouped_matmul(x, w, tile_group, *, transpose_w: bool, out_dtype, blocks: TritonBlocks,
                   interpret: bool):
    """Y [P, N] = X [P, K] @ W[tile_group[row // block_m]] in out_dtype, fp32 accumulation.

    x: [P, K]; w: [G, K, N] ([G, N, K] with transpose_w); tile_group: [P // block_m] int32 in
    [0, G]. P, K, N multiples of block_m, block_k, block_n (api.py pads K and N).
    """
    p, k = x.shape
    n_groups = w.shape[0]
    n = w.shape[1] if transpose_w else w.shape[2]
    bm, bn = blocks.block_m, blocks.block_n
    m_tiles, n_tiles = p // bm, n // bn
    tile = functools.partial(grouped_tile, m_tiles=m_tiles, n_tiles=n_tiles, group_m=blocks.group_m)
    kernel = functools.partial(_kernel, n_groups=n_groups, block_k=blocks.block_k,
                               transpose_w=transpose_w, precision=dot_precision(x.dtype),
                               m_tiles=m_tiles, n_tiles=n_tiles, group_m=blocks.group_m)
    # One grid axis: program -> (row tile, column tile) in grouped order.
    return pl.pallas_call(
        kernel,
        grid=(m_tiles * n_tiles,),
        in_specs=[pl.BlockSpec(tile_group.shape, lambda q: (0,)),
                  pl.BlockSpec((bm, k), lambda q: (tile(q)[0], 0)),
                  pl.BlockSpec(w.shape, lambda q: (0, 0, 0))],
        out_specs=pl.BlockSpec((bm, bn), tile),
        out_shape=jax.ShapeDtypeStruct((p, n), out_dtype, manual_axis_type=jax.typeof(x).manual_axis_type),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=interpret,
        name="grouped_matmul_triton",
    )(tile_group, x, w)
