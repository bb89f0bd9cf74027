"""Matmul in Pallas with the Triton lowering: the tutorial kernel (CPU: interpret mode).

Each program computes one [block_m, block_n] tile of C = A @ B: it walks K in `block_k` steps,
multiplying an A tile [block_m, block_k] by a B tile [block_k, block_n] into an fp32
accumulator (Triton emits tensor-core MMAs for `pl.dot`), then writes C once in the output dtype.
Programs are numbered in groups of `group_m` tile rows (the Triton matmul tutorial's "grouped
ordering"): programs running together read the same few A rows and B columns, which stay in L2.
Shapes must be block multiples; api.py pads. fp8 inputs take one fp32 scale, applied once to
the accumulator.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._triton import dot_precision
from pallas_kernels.matmul.config import TritonBlocks


def grouped_tile(program, m_tiles, n_tiles, group_m):
    """Program index -> (tile row, tile column), walking `group_m` tile rows column by column.
    lax.div/rem: the indices are non-negative, and they lower to plain integer ops."""
    per_group = group_m * n_tiles
    first_row = lax.div(program, per_group) * group_m
    rows_in_group = jnp.minimum(m_tiles - first_row, group_m)
    within = lax.rem(program, per_group)
    return first_row + lax.rem(within, rows_in_group), lax.div(within, rows_in_group)


def _kernel(a_ref, b_ref, *refs, block_k, scaled, precision):
    """a_ref [block_m, K], b_ref [K, block_n]; optional scale_ref [1] fp32; c_ref [block_m, block_n]."""
    scale_ref, c_ref = refs if scaled else (None, refs[0])
    block_m, block_n = c_ref.shape

    def step(i, acc):  # acc [block_m, block_n] fp32
        a = a_ref[:, pl.ds(i * block_k, block_k)]  # [block_m, block_k]
        b = b_ref[pl.ds(i * block_k, block_k), :]  # [block_k, block_n]
        return acc + pltriton.dot(a, b, precision=precision)

    acc = lax.fori_loop(0, a_ref.shape[1] // block_k, step,
                        jnp.zeros((block_m, block_n), jnp.float32))
    if scaled:
        acc = acc * scale_ref[...]  # [1] broadcast over the tile
    c_ref[...] = acc.astype(c_ref.dtype)


def matmul(a, b, scale=None, *, out_dtype, blocks: TritonBlocks, interpret: bool):
    """C = A @ B (times `scale`, an fp32 [1] array, if given) in `out_dtype`.

    a: [M, K], b: [K, N], M, N, K multiples of block_m, block_n, block_k.
    """
    (m, k), n = a.shape, b.shape[1]
    bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
    m_tiles, n_tiles = m // bm, n // bn

    def a_tile(p):
        return grouped_tile(p, m_tiles, n_tiles, blocks.group_m)[0], 0

    def b_tile(p):
        return 0, grouped_tile(p, m_tiles, n_tiles, blocks.group_m)[1]

    in_specs = [pl.BlockSpec((bm, k), a_tile), pl.BlockSpec((k, bn), b_tile)]
    operands = [a, b]
    if scale is not None:
        in_specs.append(pl.BlockSpec((1,), lambda p: (0,)))
        operands.append(scale)
    return pl.pallas_call(
        functools.partial(_kernel, block_k=bk, scaled=scale is not None,
                          precision=dot_precision(a.dtype)),
        grid=(m_tiles * n_tiles,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda p: grouped_tile(p, m_tiles, n_tiles, blocks.group_m)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                                num_stages=blocks.num_stages),
        interpret=interpret,
        name="matmul_triton",
    )(*operands)
