"""Grouped matmul over the padded layout in Pallas Mosaic GPU (Hopper): wgmma fed by TMA.

The kernel of matmul/mosaic_matmul.py (persistent CTAs walking output tiles in snake order, a
TMA memory warpgroup and two wgmma compute warpgroups, SMEM epilogue) with one change: a CTA's
row tile is one layout tile (layout.py), so before its K loop the CTA reads the tile's group
from tile_group in GMEM and streams B tiles from W[group]. Spare tiles (group G) multiply by
W[G - 1]: their rows are zero in pad_rows' output, and nothing reads them back.
16-bit inputs; shapes must be multiples of the CTA tile and tile_k (api.py pads N and K).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.matmul.config import MosaicTiles
from pallas_kernels.matmul.mosaic_matmul import DTYPES, launch, tiled_matmul

__all__ = ["grouped_matmul", "DTYPES"]


def _kernel(tile_group_gmem, x_gmem, w_gmem, y_gmem, *, tiles: MosaicTiles):
    """tile_group_gmem [T] int32, x_gmem [P, K], w_gmem [G, K, N], y_gmem [P, N] in GMEM."""
    last = w_gmem.shape[0] - 1
    tiled_matmul(x_gmem, w_gmem, y_gmem, tiles=tiles,
                 b_for_row_tile=lambda row: w_gmem.at[jnp.minimum(tile_group_gmem[row], last)])


def grouped_matmul(x, w, tile_group, *, out_dtype, tiles: MosaicTiles, interpret: bool):
    """Y [P, N] = X [P, K] @ W[tile_group[row // cta_m]] in out_dtype, fp32 accumulation.

    x: [P, K], w: [G, K, N] (bf16 or fp16); tile_group [P // tiles.cta_m] int32 in [0, G].
    N a multiple of tiles.cta_n, K of tiles.tile_k.
    """
    y = launch(functools.partial(_kernel, tiles=tiles), (x.shape[0], w.shape[2]), out_dtype,
               tile_group, x, w, interpret=interpret)
    # plgpu.kernel traces with shard_map's varying-axis checks off, so y comes back typed as
    # varying over no mesh axis; inside shard_map it varies as x does.
    missing = jax.typeof(x).manual_axis_type.varying - jax.typeof(y).manual_axis_type.varying
    return jax.lax.pcast(y, tuple(missing), to="varying") if missing else y
