"""How fast can one persistent kernel stream a decode step's weights? (Pallas Mosaic GPU, Hopper)

A batch-1 decode step reads each weight matrix once, in order, each read depending on the one
before. Run as a kernel per matrix (pallas_kernels.matvec) every read pays a launch, a ramp and
a tail. A persistent kernel, one CTA an SM, can instead keep the weights flowing: its memory
warpgroup copies [64, 256] tiles into a ring of shared-memory slots with TMA, one chained
warp-specialized pipeline per matrix, and keeps fetching the next matrix's first tiles while
the compute warpgroup waits at the grid barrier that orders the two (weights depend on
nothing; only the products wait for the activations they multiply).

This kernel is that stream and nothing more: each tile is multiplied on the tensor cores by a
fixed x [8, 256] (swap-AB wgmma: the tile is the 64-row A operand, x the N = 8 B operand, as a
decode step with up to 8 rows would), and a CTA keeps only its last product. So its time is
the ceiling of a persistent step built this way, against the copy bandwidth and the matvec
loop; `reference.last_products` says what `out` must hold.

Phases are split into tiles, tile t of a [N, K] matrix covering rows 64 (t // (K/256)) and
columns 256 (t % (K/256)); CTA c takes tiles c, c + C, ... (C CTAs). A phase takes the same
number of steps on every CTA (the chained pipelines need it, rounded up to a multiple of the
slots in flight), and the steps past a phase's last tile read its last tile again (from L2).
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE_N, TILE_K = 64, 256  # 32 KB of bf16; wgmma's A operand is 64 rows
X_ROWS = 8  # wgmma's smallest N
SWIZZLE = 128  # bytes: the tiles' shared-memory layout, as wgmma reads them
TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
H100_SMS = 132
MAX_CONCURRENT = 6  # tile slots: 192 of the 227 KB of shared memory a CTA may take


def check_weights(weights, *, stacked: bool = False):
    """Raise ValueError unless `weights` is a non-empty list of bfloat16 [N, K] (or, if stacked,
    [layers, N, K]) matrices whose tiles divide them."""
    ndims = (2, 3) if stacked else (2,)
    bad = [(i, w.shape, w.dtype) for i, w in enumerate(weights)
           if w.ndim not in ndims or w.shape[-2] % TILE_N or w.shape[-1] % TILE_K or w.dtype != jnp.bfloat16]
    if not weights or bad:
        shapes = "[N, K] or [layers, N, K]" if stacked else "[N, K]"
        raise ValueError(f"weights must be a non-empty list of bfloat16 {shapes} with N % {TILE_N} == 0 and "
                         f"K % {TILE_K} == 0; got (index, shape, dtype) {bad or 'none'}")


def check_concurrent(concurrent: int):
    if not 1 <= concurrent <= MAX_CONCURRENT:
        raise ValueError(f"concurrent={concurrent} must be in [1, {MAX_CONCURRENT}] (32 KB of shared memory each)")


def chain_state(number: int, count: int):
    """The pipeline_state of pipeline `number` of `count` chained ones (None for a lone one)."""
    if count == 1:
        return None
    return (plgpu.PipelinePipeline.START if number == 0 else plgpu.PipelinePipeline.STOP if number == count - 1
            else plgpu.PipelinePipeline.STEADY)


def steps_per_phase(n: int, k: int, ctas: int, concurrent: int) -> int:
    """Pipeline steps of an [n, k] phase on each of `ctas` CTAs, a multiple of `concurrent`."""
    per_cta = pl.cdiv((n // TILE_N) * (k // TILE_K), ctas)
    return pl.cdiv(per_cta, concurrent) * concurrent


def tile_of(cta, step, n: int, k: int, ctas: int):
    """(row block, column block) of the tile CTA `cta` reads at `step` of an [n, k] phase."""
    chunks = k // TILE_K
    tile = jnp.minimum(cta + step * ctas, (n // TILE_N) * chunks - 1)
    return tile // chunks, tile % chunks


def _kernel(*refs, shapes, ctas, concurrent, barriers):
    *weights, x_gmem, out_gmem, x_smem, x_barrier = refs
    compute_wg = 0  # the pipelines' memory warpgroup is the last one
    cta = lax.axis_index("sm")
    done = pl.get_global(plgpu.SemaphoreType.REGULAR)  # phases finished, summed over CTAs; 0 at launch

    @pl.when(lax.axis_index("wg") == compute_wg)
    def _():
        plgpu.copy_gmem_to_smem(x_gmem, x_smem, x_barrier.at[0])
        plgpu.barrier_wait(x_barrier.at[0])

    def pipeline(p, n, k):
        steps = steps_per_phase(n, k, ctas, concurrent)
        last_phase = p == len(shapes) - 1

        def body(indices, w_smem):
            (step,) = indices
            if barriers and p:  # every CTA has finished the phase before: its outputs are this one's inputs
                @pl.when(step == 0)
                def _():
                    pl.semaphore_wait(done, p * ctas, decrement=False)

            def product(acc):
                plgpu.wgmma(acc, w_smem, x_smem.T)
                plgpu.wgmma_wait(0)
                return acc[...]

            out_gmem[cta] = pl.run_scoped(product, plgpu.ACC((TILE_N, X_ROWS), jnp.float32))
            if barriers and not last_phase:  # signalled as soon as done, not when the next tile lands
                @pl.when(step == steps - 1)
                def _():
                    pl.semaphore_signal(done, 1)

        state = chain_state(p, len(shapes))
        spec = plgpu.BlockSpec((TILE_N, TILE_K), lambda step: tile_of(cta, step, n, k, ctas), transforms=TRANSFORMS)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), in_specs=[spec],
            max_concurrent_steps=concurrent, memory_registers=40, wg_axis="wg", num_compute_wgs=1,
            pipeline_state=state)

    pipelines = [pipeline(p, n, k) for p, (n, k) in enumerate(shapes)]

    def run(slots):  # one ring of slots shared by every phase: its tiles all have one shape
        for run_phase, w in zip(pipelines, weights):
            run_phase(w, allocations=slots)

    pl.run_scoped(run, pipelines[0].get_allocations(weights[0]), collective_axes="wg")


def stream_weights(weights, x, *, concurrent: int = 2, barriers: bool = True, ctas: int | None = None):
    """Stream `weights` in order through one persistent kernel.

    Args:
      weights: [N, K] bfloat16 matrices, N a multiple of 64 and K of 256 (a decode step's reads).
      x: [8, 256] bfloat16, multiplied by every tile.
      concurrent: tiles in flight a CTA (shared-memory slots of 32 KB), 1 to MAX_CONCURRENT.
      barriers: a grid barrier before each phase after the first, as dependent phases need.
      ctas: CTAs (one an SM; all must be resident at once or the barrier never opens); default
        the device's SM count (an H100's 132 where there is no GPU, for lowering).
    Returns:
      [ctas, 64, 8] fp32: each CTA's last tile times x.T (`reference.last_products`).
    Raises:
      ValueError: a weight or x of the wrong shape or dtype, or concurrent < 1.
    """
    check_weights(weights)
    shapes = [tuple(w.shape) for w in weights]
    if x.shape != (X_ROWS, TILE_K) or x.dtype != jnp.bfloat16:
        raise ValueError(f"x must be bfloat16 of shape {(X_ROWS, TILE_K)}; got {x.shape}, {x.dtype}")
    check_concurrent(concurrent)
    ctas = ctas or (jax.devices()[0].core_count if jax.default_backend() == "gpu" else H100_SMS)
    kernel = plgpu.kernel(
        lambda *refs: _kernel(*refs, shapes=shapes, ctas=ctas, concurrent=concurrent, barriers=barriers),
        out_type=jax.ShapeDtypeStruct((ctas, TILE_N, X_ROWS), jnp.float32), grid=(ctas,), grid_names=("sm",),
        num_threads=2, thread_name="wg",
        scratch_types=[plgpu.SMEM((X_ROWS, TILE_K), jnp.bfloat16, transforms=TRANSFORMS),
                       plgpu.Barrier(num_barriers=1)])
    return kernel(*weights, x)
