"""Tiles of the grouped matmul kernels and their heuristic defaults.

The kernels take matmul/config.py's TritonBlocks and MosaicTiles. Rows kernels: the row tile
(triton_fwd.py's block_m, mosaic_fwd.py's cta_m) is the layout's `tile_m`; the rest as in a
matmul. Weight-gradient kernel (triton_bwd.py): block_m tiles K and block_n tiles N of dW, and
rows are reduced tile_m at a time.
"""
import dataclasses

from pallas_kernels.matmul.config import (MosaicTiles, TritonBlocks, default_triton_blocks,
                                          fit_block)


def default_tile_m(m: int, dtype, backend: str = "triton") -> int:
    """The row tile of the padded layout: the matmul heuristic's block_m (128 for 16-bit, 64 for
    fp32), shrunk for few rows (Triton; Mosaic's wgmma needs >= 64). Each group pads to it, so
    a smaller tile wastes fewer rows when groups are small (many experts, few tokens)."""
    tile = fit_block(default_triton_blocks(m, 128, 128, dtype).block_m, m)
    return max(tile, 64) if backend == "mosaic" else tile


def default_mosaic_tiles(tile_m: int, n: int) -> MosaicTiles:
    """Mosaic rows kernel: a CTA of one layout tile of rows (the two warpgroups side by side
    along N), [tile_m, 128] accumulators ([tile_m, 64] when N <= 128)."""
    return MosaicTiles(tile_m=tile_m, tile_n=64 if n <= 128 else 128, wg_dimension="n")


def default_blocks(tile_m: int, n: int, k: int, dtype) -> TritonBlocks:
    """Rows kernel: the matmul heuristic for an [tile_m-row tile] x K x N product."""
    return dataclasses.replace(default_triton_blocks(max(tile_m, 128), n, k, dtype), block_m=tile_m)


def default_weight_grad_blocks(k: int, n: int, dtype) -> TritonBlocks:
    """Weight-gradient kernel: the matmul heuristic's tile of a K x N output (block_k unused)."""
    return default_triton_blocks(k, n, 128, dtype)

