"""Matmul in Pallas Mosaic GPU for Hopper: wgmma fed by a TMA pipeline, warp-specialized.

A CTA runs three warpgroups. The memory warpgroup streams A [cta_m, tile_k] and B [tile_k, cta_n]
tiles by TMA into `max_concurrent_steps` shared-memory slots; the two compute warpgroups each
multiply their half of the CTA tile with wgmma into an fp32 register accumulator [tile_m, tile_n]
(plgpu.emit_pipeline_warp_specialized does the slot and barrier bookkeeping). The grid is
persistent: one CTA per SM walks the output tiles in a snake order (plgpu.planar_snake), so the
CTAs running at once share A rows and B columns in L2, and each CTA's epilogue (registers ->
SMEM -> TMA store, in [64, 64] pieces through two slots) overlaps the next tile's loads.
The structure follows the upstream jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py.
Shapes must be multiples of the CTA tile and tile_k; api.py pads. 16-bit inputs only.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.matmul.config import MosaicTiles

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
COMPUTE_WGS = 2
_MEMORY_REGISTERS = 40  # the TMA-issuing warpgroup needs few registers; compute ones get the rest
EPILOGUE_TILE = 64  # output pieces stored per TMA copy (32 fails Mosaic layout inference)


def _swizzled(minor_elements: int, dtype):
    """SMEM transforms for a tile whose minor dimension holds `minor_elements` of `dtype`."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elements * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def num_sms() -> int:
    """SMs of the target GPU: the abstract device's in interpret mode, else the real one's."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.num_cores
    count = getattr(jax.devices()[0], "core_count", None)
    if not count:
        raise ValueError(f"the Mosaic matmul needs the GPU's SM count; {jax.devices()[0].device_kind!r} "
                         "has none: run on a GPU, or in interpret mode inside "
                         "jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device="
                         "AbstractDevice(..., platform='gpu', num_cores=N)))")
    return count


def tiled_matmul(a_gmem, b_gmem, c_gmem, *, tiles: MosaicTiles, b_for_row_tile=None):
    """The kernel body, run on every warpgroup of a CTA: c_gmem [M, N] = a_gmem [M, K] @ B, all
    in GMEM. B is b_gmem [K, N]; or, with `b_for_row_tile(tile_row)` (the grouped matmul: a
    row tile's group picks its weight), b_gmem is [G, K, N] and that function gives the [K, N]
    ref for the CTA row tile `tile_row`."""
    b_template = b_gmem if b_for_row_tile is None else b_gmem.at[0]  # shapes for the allocations
    (m, k), n = a_gmem.shape, b_template.shape[1]
    tm, tn, tk, epi = tiles.tile_m, tiles.tile_n, tiles.tile_k, EPILOGUE_TILE
    cta_m, cta_n = tiles.cta_m, tiles.cta_n
    m_tiles, n_tiles = m // cta_m, n // cta_n
    operand_transforms = _swizzled(tk, a_gmem.dtype)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // tk,),
            memory_registers=_MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((cta_m, tk), lambda kk: (0, kk), transforms=operand_transforms),
                plgpu.BlockSpec((tk, cta_n), lambda kk: (kk, 0),
                                transforms=_swizzled(cta_n, b_gmem.dtype)),
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
        pipeline_allocs=pipeline(unused, unused).get_allocations(a_gmem, b_template),
        out_smem=plgpu.SMEM((COMPUTE_WGS, 2, epi, epi), c_gmem.dtype,
                            transforms=_swizzled(epi, c_gmem.dtype)),
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
            cta_rows = pl.ds(tile_row * cta_m, cta_m)
            cta_cols = pl.ds(tile_col * cta_n, cta_n)
            # This warpgroup's [tile_m, tile_n] part of the CTA tile.
            if tiles.wg_dimension == "m":
                wg_rows, wg_cols = pl.ds(wg * tm, tm), slice(None)
            else:
                wg_rows, wg_cols = slice(None), pl.ds(wg * tn, tn)

            def compute_context(run_pipeline):
                def with_acc(acc_ref):  # acc_ref [tile_m, tile_n] fp32, in registers
                    run_pipeline(acc_ref)
                    out = acc_ref[...].astype(c_gmem.dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores read
                    c_tile = c_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols]
                    for i in range(tm // epi):
                        for j in range(tn // epi):
                            slot = (i * (tn // epi) + j) % 2
                            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # slot free again
                            out_smem[wg, slot] = out[i * epi:(i + 1) * epi, j * epi:(j + 1) * epi]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                c_tile.at[pl.ds(i * epi, epi), pl.ds(j * epi, epi)])
                pl.run_scoped(with_acc, plgpu.ACC((tm, tn), jnp.float32))

            def mma(indices, a_smem, b_smem, acc_ref):  # a_smem [cta_m, tk], b_smem [tk, cta_n]
                del indices
                plgpu.wgmma(acc_ref, a_smem.at[wg_rows], b_smem.at[:, wg_cols])
                plgpu.wgmma_wait(0)
                return acc_ref

            b_rows = b_gmem if b_for_row_tile is None else b_for_row_tile(tile_row)
            pipeline(mma, compute_context)(a_gmem.at[cta_rows, :], b_rows.at[:, cta_cols],
                                           allocations=pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store has read its SMEM


def launch(body, out_shape, out_dtype, *args, interpret: bool):
    """Run a kernel body built on tiled_matmul: one persistent CTA per SM, a memory warpgroup
    and COMPUTE_WGS compute warpgroups."""
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(*args)


def matmul(a, b, *, out_dtype, tiles: MosaicTiles, interpret: bool):
    """C = A @ B in `out_dtype`: a [M, K], b [K, N] (bf16 or fp16), M a multiple of tiles.cta_m,
    N of tiles.cta_n, K of tiles.tile_k."""
    return launch(functools.partial(tiled_matmul, tiles=tiles), (a.shape[0], b.shape[1]), out_dtype,
                  a, b, interpret=interpret)
