"""Tile configs of the matmul kernels, their heuristic defaults and the tuning-table lookup.

C[M, N] = A[M, K] @ B[K, N]. A program (Triton) or CTA (Mosaic) owns a tile of C and loops over K.
"""
import dataclasses

import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.autotune import table


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Pallas Triton and Triton-language kernels: a program computes a [block_m, block_n] tile of
    C, stepping `block_k` columns of A (rows of B) at a time; programs are ordered in groups of
    `group_m` tile rows so neighbours share A and B tiles in L2 (the Triton tutorial's order)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("block_m", "block_n", "block_k", "num_warps"),
                                 warps=("num_warps",))
        for name in ("block_m", "block_n", "block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"TritonBlocks.{name}={getattr(self, name)} must be >= 16 (tl.dot)")
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"TritonBlocks group_m={self.group_m}, num_stages={self.num_stages} "
                             "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Mosaic GPU kernel: each of the two compute warpgroups owns a [tile_m, tile_n] accumulator;
    they sit side by side along `wg_dimension` ("m" or "n"), so a CTA covers 2 tiles. K advances
    `tile_k` per step through `max_concurrent_steps` shared-memory slots fed by TMA. CTAs are
    persistent (one per SM) and walk the output tiles in bands `grid_tile_width` tiles wide
    along `grid_minor` ("m" or "n"), so concurrent CTAs reuse operands in L2."""
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    wg_dimension: str = "n"
    grid_minor: str = "n"
    grid_tile_width: int = 8

    def __post_init__(self):
        if self.tile_m % 64 or not 64 <= self.tile_m <= 256:
            raise ValueError(f"MosaicTiles.tile_m={self.tile_m} must be 64, 128, 192 or 256 (wgmma M)")
        if self.tile_n % 64 or not 64 <= self.tile_n <= 256:
            raise ValueError(f"MosaicTiles.tile_n={self.tile_n} must be 64, 128, 192 or 256")
        if self.tile_k not in (64, 128):  # 32 (a 64-byte swizzle) fails Mosaic layout inference
            raise ValueError(f"MosaicTiles.tile_k={self.tile_k} must be 64 or 128")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"MosaicTiles.max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
        for name in ("wg_dimension", "grid_minor"):
            if getattr(self, name) not in ("m", "n"):
                raise ValueError(f"MosaicTiles.{name}={getattr(self, name)!r} must be 'm' or 'n'")
        if self.grid_tile_width < 1:
            raise ValueError(f"MosaicTiles.grid_tile_width={self.grid_tile_width} must be >= 1")

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dimension == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dimension == "n" else 1)


def fit_block(block: int, size: int, smallest: int = 16) -> int:
    """Shrink a power-of-two block to the power of two covering `size` (>= smallest)."""
    return max(smallest, min(block, 1 << max(size - 1, 0).bit_length()))


def fit_to_shape(blocks: TritonBlocks, m: int, n: int, k: int) -> TritonBlocks:
    """Clip each block to the dimension it tiles, so small shapes do not pad to a big tile."""
    return dataclasses.replace(blocks, block_m=fit_block(blocks.block_m, m),
                               block_n=fit_block(blocks.block_n, n),
                               block_k=fit_block(blocks.block_k, k))


def default_triton_blocks(m: int, n: int, k: int, dtype) -> TritonBlocks:
    """Heuristic: 128 x 128 x 64 tiles (8 warps, 3 stages) for 16-bit inputs, 128-wide K steps
    for fp8 (same bytes per step), 64 x 64 x 32 tiles (4 warps) for fp32; clipped to the shape."""
    if jnp.dtype(dtype).itemsize == 1:
        base = TritonBlocks(block_k=128)
    elif jnp.dtype(dtype) == jnp.float32:
        base = TritonBlocks(block_m=64, block_n=64, block_k=32, num_warps=4)
    else:
        base = TritonBlocks()
    blocks = fit_to_shape(base, m, n, k)
    if blocks.block_m * blocks.block_n < base.block_m * base.block_n:
        blocks = dataclasses.replace(blocks, num_warps=4)  # a small tile needs fewer threads
    return blocks


def default_mosaic_tiles(m: int, n: int, k: int, dtype) -> MosaicTiles:
    """Heuristic: 2 x [128, 128] accumulators side by side along N (a 128 x 256 CTA tile), K steps
    of 64, 4 slots (4 x 48 KiB of bf16 operands); [64, 64] tiles when M or N is small."""
    del k, dtype
    if m <= 64 or n <= 128:
        return MosaicTiles(tile_m=64, tile_n=64)
    return MosaicTiles()


def triton_blocks(m: int, n: int, k: int, dtype, kernel: str = "matmul_triton") -> TritonBlocks:
    """The tuned blocks for this shape on this GPU (autotune table), else the heuristic."""
    return table.best_config(kernel, table.matmul_key(m, n, k, dtype),
                             default_triton_blocks(m, n, k, dtype))


def mosaic_tiles(m: int, n: int, k: int, dtype) -> MosaicTiles:
    """The tuned tiles for this shape on this GPU (autotune table), else the heuristic."""
    return table.best_config("matmul_mosaic", table.matmul_key(m, n, k, dtype),
                             default_mosaic_tiles(m, n, k, dtype))
