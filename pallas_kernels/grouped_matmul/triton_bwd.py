"""The weight gradient of a grouped matmul in Pallas (Triton lowering; CPU: interpret mode).

dW[g] = X_g^T @ dY_g over the padded layout (layout.py): a program owns a [block_m, block_n]
tile of dW[g] (block_m over K, block_n over N) and loops over the row tiles of group g only,
tile_m rows at a time, so the work is the routed rows' FLOPs. An empty group's tile is 0.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.matmul.config import TritonBlocks
from pallas_kernels._triton import dot_precision


def _kernel(first_tile_ref, tiles_ref, x_ref, dy_ref, dw_ref, *, tile_m, precision):
    """first_tile_ref, tiles_ref [G] int32; x_ref [P, block_m]; dy_ref [P, block_n];
    dw_ref [block_m, block_n] (the group axis squeezed)."""
    group = pl.program_id(2)
    first = first_tile_ref[group]
    block_k, block_n = dw_ref.shape

    def step(t, acc):  # acc [block_m, block_n] fp32
        rows = pl.ds(t * tile_m, tile_m)
        return acc + pltriton.dot(x_ref[rows, :], dy_ref[rows, :], trans_a=True,  # [tile_m, block_m]^T
                                  precision=precision)  # @ [tile_m, block_n]

    acc = lax.fori_loop(first, first + tiles_ref[group], step,
                        jnp.zeros((block_k, block_n), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def weight_grad(x, dy, group_first_tile, group_tiles, *, tile_m: int, out_dtype,
                blocks: TritonBlocks, interpret: bool):
    """dW [G, K, N] with dW[g] = sum over group g's row tiles of X_tile^T @ dY_tile.

    x: [P, K], dy: [P, N] in the padded layout with row tiles of tile_m rows; group_first_tile,
    group_tiles: [G] int32 (layout.py). K, N multiples of blocks.block_m, blocks.block_n.
    """
    p, k = x.shape
    n = dy.shape[1]
    n_groups = group_tiles.shape[0]
    bk, bn = blocks.block_m, blocks.block_n
    # Grid axes: (N tile of dW, K tile of dW, group); the first is launched fastest, so programs
    # running together share the group's rows of X (and of dY while N tiles are few) in L2.
    return pl.pallas_call(
        functools.partial(_kernel, tile_m=tile_m, precision=dot_precision(x.dtype)),
        grid=(n // bn, k // bk, n_groups),
        in_specs=[pl.BlockSpec((n_groups,), lambda j, i, g: (0,)),
                  pl.BlockSpec((n_groups,), lambda j, i, g: (0,)),
                  pl.BlockSpec((p, bk), lambda j, i, g: (0, i)),
                  pl.BlockSpec((p, bn), lambda j, i, g: (0, j))],
        out_specs=pl.BlockSpec((None, bk, bn), lambda j, i, g: (g, i, j)),
        out_shape=jax.ShapeDtypeStruct((n_groups, k, n), out_dtype,
                                       manual_axis_type=jax.typeof(x).manual_axis_type),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=interpret,
        name="grouped_matmul_weight_grad_triton",
    )(group_first_tile, group_tiles, x, dy)
