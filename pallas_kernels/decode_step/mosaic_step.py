"""A batch-1 decode step as one persistent kernel (Pallas Mosaic GPU, Hopper).

The step is a chain of phases, each a matrix-vector product whose input is the output of the
phases before it: x -> W x accumulated into a vector of fp32 activations in global memory. One
CTA an SM runs the whole chain, and its memory warpgroup streams every phase's [64, 256] weight
tiles with TMA through one chain of warp-specialized pipelines (as `weight_stream` measured),
so the next phase's tiles are already landing while the compute warpgroup waits at the grid
barrier that orders the two.

Each phase, on each CTA:
- at its first step, waits until every CTA has finished the phase before (a count on a global
  semaphore), then builds its whole input x once into shared memory, rounded to bf16 as the
  weights' products want it: RMSNorm(v) * g, or silu(gate) * up, or a copy;
- multiplies each of its tiles on the CUDA cores (a [64, 256] tile times its 256 entries of x,
  summed along the row: batch 1 leaves the tensor cores nothing to do), adds the residual on
  the tiles of the first 256 columns, and adds the 64 sums into the output with a TMA
  reduce-add (so the K-split of a matrix over CTAs needs no second pass);
- after its last tile, waits for its adds to land and signals the semaphore.

Tile t of an [N, K] matrix covers rows 64 (t // (K/256)) and columns 256 (t % (K/256)); CTA c
takes tiles c, c + C, ... (`weight_stream.tile_of`), padded to a whole number of slot rounds on
every CTA (the chained pipelines need it); the padding steps read a tile again and add nothing.
The accumulators start at zero: each CTA zeroes its share before the first phase's barrier.

Pallas interpret mode (the CPU tests) has no semaphores and no TMA reduction: there the kernel
runs on one CTA, which orders its phases itself, and adds with a load and a store.
"""
import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.weight_stream.mosaic_stream import (
    H100_SMS, MAX_CONCURRENT, TILE_K, TILE_N, TRANSFORMS, steps_per_phase, tile_of)

ROWS = plgpu.Layout.WGMMA.reduce(1)  # a tile's 64 row sums
COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # the 256 entries of x a tile multiplies, one per column
ZERO_BLOCK = 512  # floats: the accumulators are zeroed by TMA copies of this many


@dataclasses.dataclass(frozen=True)
class Phase:
    """out += W x (+ residual), W = weights[weight] of shape [N, K].

    x is built from the activations `source` (a name in the kernel's layout) as
      "norm":   RMSNorm(source[:K]) * norms[norm]
      "swiglu": silu(source[:K]) * source[K:2K]
      "copy":   source[:K]
    each rounded to bf16. `residual` (a name, or None) is added to out once.
    """
    weight: int
    x: str
    source: str
    out: str
    norm: int | None = None
    residual: str | None = None


def layout_of(sizes: dict[str, int], ctas: int) -> tuple[dict[str, int], int]:
    """Offsets of the named fp32 vectors in one workspace, and its length: a whole number of
    ZERO_BLOCK blocks on each of `ctas` CTAs."""
    offsets, end = {}, 0
    for name, size in sizes.items():
        offsets[name] = end
        end += size
    per_cta = pl.cdiv(end, ctas * ZERO_BLOCK) * ZERO_BLOCK
    return offsets, per_cta * ctas


def _build_x(phase: Phase, k: int, vector, norms, x_smem, eps: float):
    """x of a phase, rounded to bf16, into x_smem[:k] (fp32)."""
    v = vector(phase.source, k)
    if phase.x == "norm":
        rstd = lax.rsqrt(jnp.sum(v * v) / k + eps)
        v = v * rstd * norms.at[phase.norm][...]
    elif phase.x == "swiglu":
        up = vector(phase.source, k, start=k)
        v = v * jax.nn.sigmoid(v) * up
    x_smem.at[pl.ds(0, k)][...] = v.astype(jnp.bfloat16).astype(jnp.float32)


def _kernel(*refs, phases, shapes, offsets, size, ctas, concurrent, eps, interpret):
    n_weights = len(shapes)
    weights, (h0, norms, acts, x_smem, y_smem, zeros_smem) = refs[:n_weights], refs[n_weights:]
    compute_wg = 0  # the pipelines' memory warpgroup is the last one
    cta = lax.axis_index("sm")
    done = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR)  # phases done, summed over CTAs

    def vector_ref(name, start, length):
        return h0.at[pl.ds(start, length)] if name == "h0" else acts.at[pl.ds(offsets[name] + start, length)]

    def vector(name, length, start=0):
        return vector_ref(name, start, length)[...]

    def accumulate(dst, y):
        if interpret:  # one CTA: nothing else adds to dst
            dst[...] = dst[...] + y
            return
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # y_smem is free again
        y_smem[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, dst, reduction_op="add")

    @pl.when(lax.axis_index("wg") == compute_wg)
    def _():
        share = size // ctas
        if interpret:
            acts.at[pl.ds(cta * share, share)][...] = jnp.zeros((share,), jnp.float32)
            return
        # With TMA, as the adds will be: the same proxy orders the zeros before them.
        zeros_smem[...] = jnp.zeros((ZERO_BLOCK,), jnp.float32)
        plgpu.commit_smem()
        for block in range(share // ZERO_BLOCK):
            plgpu.copy_smem_to_gmem(zeros_smem, acts.at[pl.ds(cta * share + block * ZERO_BLOCK, ZERO_BLOCK)])
        plgpu.wait_smem_to_gmem(0)
        pl.semaphore_signal(done, 1)

    def pipeline(p, phase):
        n, k = shapes[phase.weight]
        steps = steps_per_phase(n, k, ctas, concurrent)
        tiles, chunks = (n // TILE_N) * (k // TILE_K), k // TILE_K

        def body(indices, w_smem):
            (step,) = indices

            @pl.when(step == 0)
            def _():
                if not interpret:  # every CTA has finished the phase before (or the zeroing)
                    pl.semaphore_wait(done, (p + 1) * ctas, decrement=False)
                plgpu.commit_smem()  # the last phase's reads of x_smem are done
                _build_x(phase, k, vector, norms, x_smem, eps)
                plgpu.commit_smem()

            @pl.when(cta + step * ctas < tiles)
            def _():
                rows, cols = tile_of(cta, step, n, k, ctas)
                x = plgpu.load(x_smem.at[pl.ds(cols * TILE_K, TILE_K)], layout=COLUMNS)
                w = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)
                y = jnp.sum(w * x[None, :], axis=1)
                if phase.residual is not None:  # once per row, on the first column block
                    res = plgpu.load(vector_ref(phase.residual, rows * TILE_N, TILE_N), layout=ROWS, optimized=False)
                    y = y + res * jnp.where(cols == 0, 1.0, 0.0)
                accumulate(acts.at[pl.ds(offsets[phase.out] + rows * TILE_N, TILE_N)], y)

            if not interpret:
                @pl.when(step == steps - 1)
                def _():
                    plgpu.wait_smem_to_gmem(0)  # this CTA's adds have landed
                    pl.semaphore_signal(done, 1)

        last = len(phases) - 1
        state = (None if len(phases) == 1 else plgpu.PipelinePipeline.START if p == 0
                 else plgpu.PipelinePipeline.STOP if p == last else plgpu.PipelinePipeline.STEADY)
        spec = plgpu.BlockSpec((TILE_N, TILE_K), lambda step: tile_of(cta, step, n, k, ctas), transforms=TRANSFORMS)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), in_specs=[spec],
            max_concurrent_steps=concurrent, memory_registers=40, wg_axis="wg", num_compute_wgs=1,
            pipeline_state=state)

    pipelines = [pipeline(p, phase) for p, phase in enumerate(phases)]

    def run(slots):  # one ring of slots shared by every phase: its tiles all have one shape
        for run_phase, phase in zip(pipelines, phases):
            run_phase(weights[phase.weight], allocations=slots)

    pl.run_scoped(run, pipelines[0].get_allocations(weights[phases[0].weight]), collective_axes="wg")


def run_phases(weights, norms, h0, phases, sizes, *, eps: float = 1e-5, concurrent: int = 4,
               ctas: int | None = None, interpret: bool = False):
    """Run a chain of phases in one persistent kernel; returns the fp32 activations by name.

    Args:
      weights: [N, K] bfloat16 matrices, N a multiple of 64 and K of 256.
      norms: [M, D] fp32 RMSNorm scales ("norm" phases pick a row).
      h0: [D] fp32, the input vector (the name "h0" in phases).
      phases: Phase list, in order.
      sizes: name -> length of every activation vector the phases write (all start at zero).
      eps: RMSNorm epsilon.
      concurrent: weight tiles in flight a CTA (32 KB of shared memory each).
      ctas: CTAs, all resident at once; default the device's SM count (an H100's 132 where there
        is no GPU, for lowering), and 1 in interpret mode (which has no grid barrier).
    Returns:
      dict name -> fp32 vector.
    Raises:
      ValueError: weights of the wrong shape or dtype, phases naming unknown vectors, or concurrent
        out of range.
    """
    shapes = [tuple(w.shape) for w in weights]
    bad = [(i, w.shape, w.dtype) for i, w in enumerate(weights)
           if w.ndim != 2 or w.shape[0] % TILE_N or w.shape[1] % TILE_K or w.dtype != jnp.bfloat16]
    if not weights or bad:
        raise ValueError(f"weights must be a non-empty list of bfloat16 [N, K] with N % {TILE_N} == 0 and "
                         f"K % {TILE_K} == 0; got (index, shape, dtype) {bad or 'none'}")
    if not 1 <= concurrent <= MAX_CONCURRENT:
        raise ValueError(f"concurrent={concurrent} must be in [1, {MAX_CONCURRENT}] (32 KB of shared memory each)")
    known = set(sizes) | {"h0"}
    unknown = [(i, name) for i, ph in enumerate(phases) for name in (ph.source, ph.out, ph.residual)
               if name is not None and name not in known]
    if unknown or any(ph.x not in ("norm", "swiglu", "copy") for ph in phases):
        raise ValueError(f"phases name vectors {sorted(known)} and x in norm/swiglu/copy; got unknown "
                         f"(phase, name) {unknown} and x {[ph.x for ph in phases]}")
    if interpret:
        ctas = 1
    ctas = ctas or (jax.devices()[0].core_count if jax.default_backend() == "gpu" else H100_SMS)
    offsets, size = layout_of(sizes, ctas)
    k_max = max(shapes[ph.weight][1] for ph in phases)
    kernel = plgpu.kernel(
        lambda *refs: _kernel(*refs, phases=tuple(phases), shapes=shapes, offsets=offsets, size=size, ctas=ctas,
                              concurrent=concurrent, eps=eps, interpret=interpret),
        out_type=jax.ShapeDtypeStruct((size,), jnp.float32), grid=(ctas,), grid_names=("sm",),
        num_threads=2, thread_name="wg",
        scratch_types=[plgpu.SMEM((k_max,), jnp.float32), plgpu.SMEM((TILE_N,), jnp.float32),
                       plgpu.SMEM((ZERO_BLOCK,), jnp.float32)],
        interpret=_interpret_params() if interpret else None)
    acts = kernel(*weights, h0, norms)
    return {name: acts[offsets[name]:offsets[name] + n] for name, n in sizes.items()}


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet
    return InterpretGPUParams()
