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
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.matmul.config import MosaicTiles
from pallas_kernels.matmul.mosaic_matmul import (COMPUTE_WGS, DTYPES, EPILOGUE_TILE, _MEMORY_REGISTERS,
                                                 _num_sms, _swizzled)

__all__ = ["grouped_matmul", "DTYPES"]


def _kernel(tile_group_gmem, x_gmem, w_gmem, y_gmem, *, tiles: MosaicTiles):
    """tile_group_gmem [T] int32, x_gmem [P, K], w_gmem [G, K, N], y_gmem [P, N] in GMEM; runs
    on every warpgroup of a CTA."""
    (p, k), n = x_gmem.shape, w_gmem.shape[2]
    n_groups = w_gmem.shape[0]
    tm, tn, tk, epi = tiles.tile_m, tiles.tile_n, tiles.tile_k, EPILOGUE_TILE
    cta_m, cta_n = tiles.cta_m, tiles.cta_n
    m_tiles, n_tiles = p // cta_m, n // cta_n

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((cta_m, tk), lambda kk: (0, kk), transforms=_swizzled(tk, x_gmem.dtype)),
                plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0), transforms=_swizzled(cta_n, w_gmem.dtype)),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS,
            max_concurrent_steps=tiles.max_concurrent_steps,
            compute_context=compute_context,
        )

    def unused(*args, **kwargs):  # allocations do not depend on the body
        del args, kwargs

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=pipeline(unused, unused).get_allocations(x_gmem, w_gmem.at[0]),
        out_smem=plgpu.SMEM((COMPUTE_WGS, 2, epi, epi), y_gmem.dtype,
                            transforms=_swizzled(epi, y_gmem.dtype)),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, out_smem):
        wg = lax.axis_index("wg")
        minor = 1 if tiles.grid_minor == "n" else 0

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(info):
            (linear,) = info.index
            tile_row, tile_col = plgpu.planar_snake(linear, (m_tiles, n_tiles), minor,
                                                    tiles.grid_tile_width)
            group = jnp.minimum(tile_group_gmem[tile_row], n_groups - 1)
            cta_rows = pl.ds(tile_row * cta_m, cta_m)
            cta_cols = pl.ds(tile_col * cta_n, cta_n)
            if tiles.wg_dimension == "m":
                wg_rows, wg_cols = pl.ds(wg * tm, tm), slice(None)
            else:
                wg_rows, wg_cols = slice(None), pl.ds(wg * tn, tn)

            def compute_context(run_pipeline):
                def with_acc(acc_ref):  # acc_ref [tile_m, tile_n] fp32, in registers
                    run_pipeline(acc_ref)
                    out = acc_ref[...].astype(y_gmem.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores read
                    y_tile = y_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols]
                    for i in range(tm // epi):
                        for j in range(tn // epi):
                            slot = (i * (tn // epi) + j) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # slot free again
                            out_smem[wg, slot] = out[i * epi:(i + 1) * epi, j * epi:(j + 1) * epi]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                y_tile.at[pl.ds(i * epi, epi), pl.ds(j * epi, epi)])
                pl.run_scoped(with_acc, plgpu.ACC((tm, tn), jnp.float32))

            def mma(indices, x_smem, w_smem, acc_ref):  # x_smem [cta_m, tk], w_smem [tk, cta_n]
                del indices
                plgpu.wgmma(acc_ref, x_smem.at[wg_rows], w_smem.at[:, wg_cols])
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(mma, compute_context)(x_gmem.at[cta_rows, :], w_gmem.at[group, :, cta_cols],
                                           allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store has read its SMEM


def grouped_matmul(x, w, tile_group, *, out_dtype, tiles: MosaicTiles, interpret: bool):
    """Y [P, N] = X [P, K] @ W[tile_group[row // cta_m]] in out_dtype, fp32 accumulation.

    x: [P, K], w: [G, K, N] (bf16 or fp16); tile_group [P // tiles.cta_m] int32 in [0, G].
    N a multiple of tiles.cta_n, K of tiles.tile_k.
    """
    p, n = x.shape[0], w.shape[2]
    y = plgpu.kernel(
        functools.partial(_kernel, tiles=tiles),
        out_type=jax.ShapeDtypeStruct((p, n), out_dtype),
        grid=(_num_sms(),),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(tile_group, x, w)
    # plgpu.kernel traces with shard_map's varying-axis checks off, so y comes back typed as
    # varying over no mesh axis; inside shard_map it varies as x does.
    missing = jax.typeof(x).manual_axis_type.varying - jax.typeof(y).manual_axis_type.varying
    return jax.lax.pcast(y, tuple(missing), to="varying") if missing else y
