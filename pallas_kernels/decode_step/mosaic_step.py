"""A batch-1 decode step as one persistent kernel (Pallas Mosaic GPU, Hopper).

The step is a chain of phases, each a matrix-vector product whose input is the output of the
phases before it: x -> W x accumulated into a vector of fp32 activations in global memory. One
CTA an SM runs the whole chain as two warpgroups. The memory warpgroup streams every phase's
[64, 256] weight tiles with TMA into a ring of shared-memory slots, one loop over the whole
step that waits only for a slot to be free, so the next phase's tiles are already landing
while the compute warpgroup waits at the grid barrier that orders the two. The compute
warpgroup runs the phases.

Each phase, on each CTA:
- first waits until every CTA has finished the phase before (a count on a global
  semaphore), then builds its input x once into shared memory, rounded to bf16 as the weights'
  products want it: RMSNorm(v) * g (all of x: the statistic needs it), or silu(gate) * up, or a
  copy (only the 256-entry chunks its own tiles take);
- multiplies each of its tiles on the CUDA cores (a [64, 256] tile times its 256 entries of x,
  summed along the row; a swap-AB wgmma with x as an N = 8 operand measured 2.6% slower on an
  H100: the tiles overlap the weight stream, while x's extra conversion lengthens every
  phase's critical path), adds the residual on the tiles of the first 256 columns, and adds
  the 64 sums into the output with a TMA reduce-add (so the K-split of a matrix over CTAs needs
  no second pass; fp32 reds from registers instead measured no faster);
- after its last tile, waits for its adds to land and signals the semaphore.

Tile t of an [N, K] matrix covers rows 64 (t // (K/256)) and columns 256 (t % (K/256)). Of C
CTAs, tile t goes to CTA (t + r) mod C, the rotation r moving on by each phase's remainder
(tiles mod C), so the CTAs' counts differ by at most one over any run of phases and no phase
is padded (chained `emit_pipeline_warp_specialized` pipelines must round every phase up to a
multiple of the slots: 648 steps a CTA at 4 slots for Llama 1.1B, where this takes 479). Both
warpgroups walk the same schedule; one tile counter across the step names each tile's slot.
The activations live in one fp32 workspace that the caller zeroes (with the step's input in
place) and the kernel updates in place. A step's layers share one traced body: the phases of a
layer run in a loop over layers, so the kernel compiles one layer, not all of them.

One crossing waits on less than the grid: a SwiGLU phase right after the phase that writes its
source (Llama's down after gate|up), where the CTA count is a multiple of its 256-entry chunks
of x (an H100's 132 over Llama 1.1B's 22; by default the kernel leaves up to 4 SMs idle to get
such a count: 128 over Llama 3.2 1B's 32). Then the two phases split by chunk instead: chunk c
goes to a group of C / chunks CTAs, which take all of gate|up's tiles that feed chunk c (its
256 gate and 256 up rows) and all of down's tiles that read it, and down waits on a counter a
chunk, signalled once by each CTA of the group, not on every CTA (0.5% faster a step on an H100
than the grid barrier there). A group's CTAs with a gate|up tile fewer take the extra down tile.

The grid barriers need every CTA resident at once (one an SM, launched as an ordinary grid):
a kernel that holds SMs on another stream meanwhile could keep a CTA from starting, and the
others would wait for it forever.

Pallas interpret mode (the CPU tests) has no semaphores and no TMA reduction: there the kernel
runs on one CTA, which orders its phases itself, and adds with a load and a store.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_step import attention as attn
from pallas_kernels.weight_stream.mosaic_stream import (
    H100_SMS, TILE_K, TILE_N, TRANSFORMS, check_concurrent, check_weights)

SMEM_BYTES = 232_448  # shared memory a Hopper CTA may take
SMEM_SLACK = 4096  # barriers and alignment, over the buffers' own bytes
MAX_IDLE_SMS = 4  # SMs `default_ctas` may leave idle (3% of an H100's) for chunk groups
ROWS = plgpu.Layout.WGMMA.reduce(1)  # a tile's 64 row sums
COLUMNS = plgpu.Layout.WGMMA.reduce(0)  # the 256 entries of x a tile multiplies, one per column


@dataclasses.dataclass(frozen=True)
class Vector:
    """An fp32 activation vector of length n, one row per layer for rows > 1: a phase of layer
    l names (vector, delta) for row l + delta - first."""
    n: int
    rows: int = 1
    first: int = 0


@dataclasses.dataclass(frozen=True)
class Attention:
    """Run before a phase, after its wait: decode attention of the layer's q over its KV cache
    and the new token (`attention.attention_unit` on CTA g splits + s for kv head g, split s of
    the cache), from the vector `qkv` into `out`, the new token's rotated k and v into `new_kv`
    (k, v of head g at 128 g); then a grid barrier of its own. With splits > 1, out holds the
    splits' partials, which a "merge" phase combines. The cache's shape names the K kv heads,
    and qkv's length, (Q + 2 K) 64, the Q q heads."""
    qkv: str
    out: str
    new_kv: str
    splits: int = 1


@dataclasses.dataclass(frozen=True)
class Phase:
    """out += W x (+ residual), W = weights[weight] ([N, K], or [layers, N, K] in the layer loop,
    where layer l reads W[l]).

    x is built from the vector `source` as
      "norm":   RMSNorm(source[:K]) * norms[norm] (row l of a [layers, K] scale in the loop)
      "swiglu": silu(source[:K]) * source[K:2K]
      "copy":   source[:K]
      "merge":  the attention partials source [2 S, K] merged (sum over splits s of o_s 2^lse_s
                over the sum of 2^lse_s, rows 0..S-1 the o_s, rows S..2S-1 the lse_s)
    rounded to bf16. `residual`, or None, is added to out once. rope: out's first `rope` rows
    are heads of 64 to rotate (rotary at the cache's position, halves layout): each tile's 64
    sums are one head's, rotated before they are added (rotation is linear, so the K split's
    partials add up to the rotated sum). Vectors are named as a name (the layer's own row) or
    (name, delta).
    """
    weight: int
    x: str
    source: str | tuple[str, int]
    out: str | tuple[str, int]
    norm: int | None = None
    residual: str | tuple[str, int] | None = None
    attention: Attention | None = None
    rope: int = 0


def _named(ref) -> tuple[str, int]:
    return (ref, 0) if isinstance(ref, str) else ref


def layout_of(vectors: dict[str, Vector]) -> tuple[dict[str, int], int]:
    """Offsets of the named vectors in one workspace, and its length."""
    offsets, end = {}, 0
    for name, v in vectors.items():
        offsets[name] = end
        end += v.n * v.rows
    return offsets, end


def _signal(*sems, after_tma: bool):
    """+1 on each semaphore, releasing every thread's writes at GPU scope (the waits acquire): a
    warpgroup barrier, then from one thread fence.release.gpu and a relaxed add to each (one
    release serves them all; a release a tile measured 8% slower a step). after_tma: the writes
    include completed TMA reduce-adds (async proxy), which other CTAs read with generic loads, so
    a proxy fence orders them first. The release costs ~0.07 ms a step against an unsafe
    relaxed add: it waits for the phase's adds to land in a memory system that the weight stream
    keeps busy (benchmarks/NOTES.md, twenty-first session)."""
    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in sems))
    def _(ctx, *refs):
        mgpu_utils.warpgroup_barrier()
        one = mgpu_utils.single_thread_predicate(mgpu_utils.ThreadSubset.WARPGROUP)
        if after_tma:
            mgpu_utils.inline_ptx("fence.proxy.async.global;", predicate=one, has_side_effects=True)
        mgpu_utils.inline_ptx("fence.release.gpu;", predicate=one, has_side_effects=True)
        for sem in refs:
            mgpu_utils.inline_ptx("red.relaxed.gpu.global.add.u32 [$0], 1;", mgpu_utils.memref_ptr(sem),
                                  predicate=one, has_side_effects=True)
    _(*sems)


def _wait(done, count):
    plgpu.semaphore_wait(done, count, decrement=False, memory_scope="gpu")


def _slotted(phase: Phase, shape, ctas: int) -> bool:
    """Whether a phase builds only its CTA's chunks of x, one a tile (fewer than all of x),
    rather than all of x (which a norm's statistic needs anyway)."""
    return phase.x != "norm" and _most_tiles(shape, ctas) * TILE_K < shape[-1]


def tile_share(cta, rotation, tiles: int, ctas: int):
    """(first tile, count) of CTA `cta` in a phase of `tiles` tiles: it takes tiles first,
    first + ctas, ..., tile t going to CTA (t + rotation) mod ctas (rotation in [0, ctas)).
    A chunk group shares its chunk's tiles so too, ctas its size and cta any CTA (its member is
    cta mod ctas), the rotation putting the members with a tile fewer before first."""
    first = lax.rem(cta - rotation + ctas, ctas)
    return first, tiles // ctas + jnp.where(first < tiles % ctas, 1, 0)


def feeding_tile(t, chunk, n: int, k: int):
    """(row block, column block) of tile t of the 2 (256 / 64) (K / 256) tiles of an [n, k]
    matrix (gate's rows over up's) that feed chunk `chunk` of SwiGLU's x: gate's first."""
    per_half, blocks = (TILE_K // TILE_N) * (k // TILE_K), k // TILE_K
    rows = (t // per_half) * (n // 2 // TILE_N) + (TILE_K // TILE_N) * chunk + lax.rem(t, per_half) // blocks
    return rows, lax.rem(t, blocks)


def _chunk_pair(layer_phases, shapes, ctas: int):
    """(p, chunks) if layer phase p + 1 is a SwiGLU phase reading only chunks of the source that
    phase p writes (gate over up, as rows), split into `chunks` of 256 entries with a group of
    CTAs each; else None."""
    for p, (feeds, fed) in enumerate(zip(layer_phases, layer_phases[1:])):
        k = shapes[fed.weight][-1]
        if (fed.x == "swiglu" and _named(feeds.out) == _named(fed.source) and shapes[feeds.weight][-2] == 2 * k
                and ctas % (k // TILE_K) == 0 and _slotted(fed, shapes[fed.weight], ctas)):
            return p, k // TILE_K
    return None


def default_ctas(layer_phases, shapes, sms: int) -> int:
    """CTAs on `sms` SMs: all of them, or up to MAX_IDLE_SMS fewer where that count lets the layer
    phases form chunk groups (`_chunk_pair`): on an H100, Llama 3.2 1B's step on 128 of the 132
    SMs (its 32 chunks in groups of 4) is 1.4% faster than on all 132 with the grid barrier
    between gate|up and down (benchmarks/NOTES.md, twenty-eighth session)."""
    for ctas in range(sms, max(sms - MAX_IDLE_SMS, 1) - 1, -1):
        if _chunk_pair(layer_phases, shapes, ctas):
            return ctas
    return sms


def _tile_at(t, k: int):
    """(row block, column block) of tile t of an [N, K] matrix: both warpgroups name tiles so."""
    return t // (k // TILE_K), lax.rem(t, k // TILE_K)


def _most_tiles(shape, ctas: int) -> int:
    """The most tiles of an [N, K] phase any CTA takes."""
    n, k = shape[-2:]
    return pl.cdiv((n // TILE_N) * (k // TILE_K), ctas)


def _x_length(phase: Phase, shape, ctas: int) -> int:
    """Entries of x_smem the phase fills."""
    return _most_tiles(shape, ctas) * TILE_K if _slotted(phase, shape, ctas) else shape[-1]


def _barriers(phase: Phase) -> int:
    """Grid barriers a phase waits at: its own, and one after its attention."""
    return 1 + (phase.attention is not None)


def _kernel(*refs, layer_phases, final_phases, shapes, vectors, offsets, layers, ctas, concurrent, eps,
            interpret):
    n_weights = len(shapes)
    weights, (norms, cache, acts, x_smem, y_smem, roll_smem, attn_scratch, w_slots, produced, consumed) = (
        refs[:n_weights], refs[n_weights:])
    cta = lax.axis_index("sm")
    done = None if interpret else pl.get_global(plgpu.SemaphoreType.REGULAR)  # phases done, summed over CTAs
    tiles = [(s[-2] // TILE_N) * (s[-1] // TILE_K) for s in shapes]
    pair = None if interpret else _chunk_pair(layer_phases, shapes, ctas)
    roles = {pair[0]: "feeds", pair[0] + 1: "fed"} if pair else {}  # layer phase -> its part in the pair
    if pair:
        chunks = pair[1]
        group = ctas // chunks
        chunk_done = pl.get_global(plgpu.SemaphoreType.REGULAR((chunks,)))  # a chunk's group CTAs done, summed
        mine_chunk = cta // group
    extra = lambda phases: sum(tiles[ph.weight] % ctas for ph in phases)  # noqa: E731
    per_layer_extra = extra(layer_phases)

    def rotation_of(layer, in_loop, p):
        return lax.rem(layer * per_layer_extra + extra((layer_phases if in_loop else final_phases)[:p]), ctas)

    def share_of(phase, role, rotation):
        """(first, count): this CTA's tiles of the phase (`tile_at` names them)."""
        if role is None:
            return tile_share(cta, rotation, tiles[phase.weight], ctas)
        # the members with a gate|up tile fewer take the extra down tile
        skip = 0 if role == "feeds" else (tiles[layer_phases[pair[0]].weight] // chunks) % group
        return tile_share(cta, skip, tiles[phase.weight] // chunks, group)

    def tile_at(phase, role, first, i, k):
        """(row block, column block) of this CTA's i-th tile (past its count, the column block is
        still one of the matrix's: build_x reads x there and never uses it)."""
        if role is None:
            return _tile_at(first + i * ctas, k)
        t = first + i * group  # of the chunk's tiles
        if role == "fed":  # row block t of column block mine_chunk
            return t, mine_chunk
        return feeding_tile(t, mine_chunk, *shapes[phase.weight][-2:])

    def vector_ref(ref, layer, start, length):
        name, delta = _named(ref)
        row = layer + delta - vectors[name].first if vectors[name].rows > 1 else 0
        return acts.at[pl.ds(offsets[name] + row * vectors[name].n + start, length)]

    def build_x(phase, role, n, k, first, layer, scale):
        """x of a phase, rounded to bf16, into x_smem (fp32): at column offsets, or at tile
        offsets if slotted. Every load is issued before any arithmetic: one round trip to L2.
        scale: a norm phase's RMSNorm scale, already loaded (None for the others)."""
        parts = vectors[_named(phase.source)[0]].n // k  # rows of source: 2 for SwiGLU, 2 S to merge

        def finish(v, scale=None):
            if phase.x == "norm":
                v = v[0] * lax.rsqrt(jnp.sum(v[0] * v[0]) / k + eps) * scale
            elif phase.x == "swiglu":
                v = v[0] * jax.nn.sigmoid(v[0]) * v[1]
            elif phase.x == "merge":
                outs, lses = v[:parts // 2], v[parts // 2:]
                top = functools.reduce(jnp.maximum, lses)
                shares = [jnp.exp2(lse - top) for lse in lses]
                v = sum(o * w for o, w in zip(outs, shares)) / sum(shares)
            else:
                v = v[0]
            return v.astype(jnp.bfloat16).astype(jnp.float32)

        def load(start, length):  # the source's rows a phase reads, at [start, start + length)
            rows = 1 if phase.x in ("norm", "copy") else parts
            return [vector_ref(phase.source, layer, row * k + start, length)[...] for row in range(rows)]

        if not _slotted(phase, (n, k), ctas):
            v = load(0, k)
            x_smem.at[pl.ds(0, k)][...] = finish(v, scale)
            return
        starts = [tile_at(phase, role, first, i, k)[1] * TILE_K for i in range(_most_tiles((n, k), ctas))]
        loads = [load(start, TILE_K) for start in starts]
        for i, v in enumerate(loads):
            x_smem.at[pl.ds(i * TILE_K, TILE_K)][...] = finish(v)

    def rotate(y, turn):
        """y's 64 sums (one head) rotated: y * cos + y[(r + 32) % 64] * (-sin, sin) by halves."""
        plgpu.commit_smem()  # every thread has read the last tile's rolled y
        roll_smem.at[pl.ds(0, TILE_N)][...] = y
        roll_smem.at[pl.ds(TILE_N, TILE_N)][...] = y
        plgpu.commit_smem()
        return y * turn[0] + plgpu.load(roll_smem.at[pl.ds(TILE_N // 2, TILE_N)], layout=ROWS) * turn[1]

    def accumulate(dst, y):
        if interpret:  # one CTA: nothing else adds to dst
            dst[...] = dst[...] + y
            return
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # y_smem is free again
        y_smem[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(y_smem, dst, reduction_op="add")

    def attend(spec: Attention, layer, pos):
        k_cache, v_cache, _, _ = cache
        kv_heads = k_cache.shape[2]
        scratch = attn.AttnScratch(*attn_scratch)

        def unit(u):
            attn.attention_unit(u // spec.splits, u % spec.splits, spec.splits,
                                vector_ref(spec.qkv, layer, 0, vectors[spec.qkv].n), k_cache.at[layer],
                                v_cache.at[layer], pos,
                                vector_ref(spec.out, layer, 0, vectors[spec.out].n),
                                vector_ref(spec.new_kv, layer, 0, vectors[spec.new_kv].n), scratch,
                                p_in_registers=not interpret)

        units = kv_heads * spec.splits
        if interpret:  # the one CTA takes every unit
            pl.loop(0, units)(unit)
        else:
            pl.when(cta < units)(lambda: unit(cta))

    per_layer = sum(map(_barriers, layer_phases))
    before = [sum(map(_barriers, layer_phases[:p])) for p in range(len(layer_phases))]

    def phases_of(side):
        """Run side(phase, role, layer, in_loop, number, rotation, count) over the chain, the layer
        loop and then the final phases (role: "feeds", "fed" or None, the phase's part in the
        chunk pair; number: grid barriers before the phase; count: the tiles this CTA took
        before it, whose slot and barrier parity the next tile follows). Both warpgroups walk
        it: the same schedule, the same count."""
        def layer_body(layer, count):
            for p, phase in enumerate(layer_phases):
                number = layer * per_layer + before[p]
                count = side(phase, roles.get(p), layer, True, number, rotation_of(layer, True, p), count)
            return count

        count = lax.fori_loop(0, layers, layer_body, jnp.int32(0)) if layers else jnp.int32(0)
        for p, phase in enumerate(final_phases):
            number = per_layer * layers + sum(map(_barriers, final_phases[:p]))
            count = side(phase, None, layers, False, number, rotation_of(layers, False, p), count)
        return count

    def compute(phase, role, layer, in_loop, number, rotation, count, turn=None, pos=None):
        n, k = shapes[phase.weight][-2:]
        first, mine = share_of(phase, role, rotation)
        scale = None  # a weight: loaded before the wait, so the x build's round trip carries only the vector
        if phase.x == "norm":
            scale = norms[phase.norm].at[layer if in_loop else 0][...]
        if role == "fed":  # the CTAs of its chunk group have fed this CTA's chunk of x
            _wait(chunk_done.at[mine_chunk], group * (layer + 1))
        elif not interpret:  # every CTA has finished the phases before
            _wait(done, number * ctas)
        if phase.attention is not None:
            attend(phase.attention, layer, pos)
            if not interpret:
                _signal(done, after_tma=False)
                _wait(done, (number + 1) * ctas)
        plgpu.commit_smem()  # every thread is done with the last phase's x
        build_x(phase, role, n, k, first, layer, scale)
        plgpu.commit_smem()
        slotted = _slotted(phase, (n, k), ctas)

        def tile(i, count):
            slot = lax.rem(count, concurrent)
            rows, cols = tile_at(phase, role, first, i, k)
            if phase.residual is not None:  # issued before the wait for the tile: its round trip overlaps it
                res = plgpu.load(vector_ref(phase.residual, layer, rows * TILE_N, TILE_N), layout=ROWS,
                                 optimized=False)
            plgpu.barrier_wait(produced.at[slot])
            x = plgpu.load(x_smem.at[pl.ds((i if slotted else cols) * TILE_K, TILE_K)], layout=COLUMNS)
            w_tile = plgpu.load(w_slots.at[slot], layout=plgpu.Layout.WGMMA).astype(jnp.float32)
            y = jnp.sum(w_tile * x[None, :], axis=1)
            plgpu.barrier_arrive(consumed.at[slot])  # the tile is in registers: its slot may refill
            if phase.rope:  # a 0/1 blend: a where on a scalar predicate does not lower
                head = jnp.where(rows < phase.rope // TILE_N, 1.0, 0.0)
                y = rotate(y, turn) * head + y * (1.0 - head)
            if phase.residual is not None:  # once per row, on the first column block
                y = y + res * jnp.where(cols == 0, 1.0, 0.0)
            accumulate(vector_ref(phase.out, layer, rows * TILE_N, TILE_N), y)
            return count + 1

        count = lax.fori_loop(0, mine, tile, count)
        if not interpret:
            plgpu.wait_smem_to_gmem(0)  # this CTA's adds have landed
            _signal(*([chunk_done.at[mine_chunk]] if role == "feeds" else []), done, after_tma=True)
        return count

    def fetch(phase, role, layer, in_loop, number, rotation, count):
        k = shapes[phase.weight][-1]
        first, mine = share_of(phase, role, rotation)
        w = weights[phase.weight].at[layer] if in_loop else weights[phase.weight]

        def tile(i, count):
            slot = lax.rem(count, concurrent)
            pl.when(count >= concurrent)(lambda: plgpu.barrier_wait(consumed.at[slot]))  # its last tile is read
            rows, cols = tile_at(phase, role, first, i, k)
            plgpu.copy_gmem_to_smem(w.at[pl.ds(rows * TILE_N, TILE_N), pl.ds(cols * TILE_K, TILE_K)],
                                    w_slots.at[slot], produced.at[slot])
            return count + 1

        return lax.fori_loop(0, mine, tile, count)

    @pl.when(lax.axis_index("wg") == 0)
    def _():
        plgpu.set_max_registers(256, action="increase")  # a thread's most; the memory warpgroup needs few
        turn = pos = None
        if any(ph.rope for ph in layer_phases + final_phases):  # (cos, cos) and (-sin, sin), once a step
            turn = [plgpu.load(cache[3].at[i], layout=ROWS, optimized=False) for i in range(2)]
        if any(ph.attention is not None for ph in layer_phases):  # the new token's position, once a step
            pos = cache[2][0]
        phases_of(functools.partial(compute, turn=turn, pos=pos))

    @pl.when(lax.axis_index("wg") == 1)
    def _():
        plgpu.set_max_registers(40, action="decrease")
        count = phases_of(fetch)

        @pl.loop(jnp.maximum(count - concurrent, 0), count)
        def _(i):  # the last tiles' releases: every barrier phase observed, as the hardware wants at exit
            plgpu.barrier_wait(consumed.at[lax.rem(i, concurrent)])


def run_phases(weights, norms, inputs, layer_phases, final_phases, vectors, *, layers: int, cache=None,
               eps: float = 1e-5, concurrent: int = 4, ctas: int | None = None, interpret: bool = False):
    """Run `layers` rounds of layer_phases, then final_phases, in one persistent kernel.

    Args:
      weights: bfloat16 matrices, [layers, N, K] for layer phases and [N, K] for final ones, N a
        multiple of 64 and K of 256.
      norms: fp32 RMSNorm scales, [layers, K] for layer phases and [1, K] for final ones.
      inputs: name -> fp32 [n], written to the first row of that vector before the kernel (every
        other entry of every vector starts at zero).
      layer_phases, final_phases: Phase lists, in order.
      vectors: name -> Vector, every vector the phases name.
      layers: rounds of layer_phases (final phases run as layer `layers`).
      cache: for phases with attention, (k, v, pos, rope): the layers' caches, bfloat16
        [layers, T, K, 64] (K kv heads, T a multiple of 64, positions [0, pos) valid), pos int32
        [1] (the new token's position) and rope fp32 [2, 32] (cos and sin of its angles).
      eps: RMSNorm epsilon.
      concurrent: weight tiles in flight a CTA (32 KB of shared memory each).
      ctas: CTAs, all resident at once; default `default_ctas` of the device's SM count (an
        H100's 132 where there is no GPU, for lowering), and 1 in interpret mode (which has no
        grid barrier).
    Returns:
      dict name -> fp32 [rows, n] (all of each vector's rows).
    Raises:
      ValueError: weights of the wrong shape or dtype, phases naming unknown vectors or x kinds,
        attention without a cache of the shapes above or with heads it does not take
        (`attention.check_heads`), or concurrent out of range.
    """
    check_weights(weights, stacked=True)
    check_concurrent(concurrent)
    shapes = [tuple(w.shape) for w in weights]
    if not final_phases and not (layers and layer_phases):
        raise ValueError(f"nothing to run: layers={layers}, {len(layer_phases)} layer phases, no final phases")
    if layers and not layer_phases:
        raise ValueError(f"layers={layers} needs layer_phases to run")
    if any(ph.attention is not None for ph in final_phases):
        raise ValueError("attention reads a layer's cache: only layer phases may have it")
    phases = list(layer_phases) + list(final_phases)
    refs = lambda ph: (ph.source, ph.out, ph.residual) + (  # noqa: E731
        () if ph.attention is None else (ph.attention.qkv, ph.attention.out, ph.attention.new_kv))
    unknown = [(i, _named(r)[0]) for i, ph in enumerate(phases) for r in refs(ph)
               if r is not None and _named(r)[0] not in vectors]
    if unknown or any(ph.x not in ("norm", "swiglu", "copy", "merge") for ph in phases):
        raise ValueError(f"phases name vectors {sorted(vectors)} and x in norm/swiglu/copy/merge; got unknown "
                         f"(phase, name) {unknown} and x {[ph.x for ph in phases]}")
    bad_rope = [(i, ph.rope) for i, ph in enumerate(phases) if ph.rope % TILE_N or ph.rope > shapes[ph.weight][-2]]
    if bad_rope:  # a tile's 64 rows are one head's: rotary goes by whole tiles
        raise ValueError(f"rope rotates whole heads of {TILE_N} rows within a phase's N: a multiple of {TILE_N} "
                         f"up to N; got (phase, rope) {bad_rope}")
    attends = any(ph.attention is not None for ph in phases)
    uses_cache = attends or any(ph.rope for ph in phases)
    if uses_cache:
        _check_cache(cache, layers)
        cos, sin = cache[3]
        cache = (*cache[:3], jnp.stack([jnp.concatenate([cos, cos]), jnp.concatenate([-sin, sin])]))
    if interpret:
        ctas = 1
    ctas = ctas or default_ctas(layer_phases, shapes,
                                jax.devices()[0].core_count if jax.default_backend() == "gpu" else H100_SMS)
    kv_heads = cache[0].shape[2] if attends else 0
    for ph in phases:
        if ph.attention is not None:  # qkv holds Q + 2 K heads
            attn.check_heads(vectors[_named(ph.attention.qkv)[0]].n / attn.HEAD_DIM - 2 * kv_heads, kv_heads)
    units = max((kv_heads * ph.attention.splits for ph in phases if ph.attention is not None), default=0)
    if not interpret and units > ctas:
        raise ValueError(f"attention on {units} CTAs ({kv_heads} kv heads x splits) needs as many; ctas={ctas}")
    offsets, size = layout_of(vectors)
    workspace = jnp.zeros((size,), jnp.float32)
    for name, value in inputs.items():
        workspace = lax.dynamic_update_slice(workspace, value.astype(jnp.float32), (offsets[name],))
    workspace = jax.new_ref(workspace)
    x_length = max(_x_length(ph, shapes[ph.weight], ctas) for ph in phases)
    smem = (concurrent * TILE_N * TILE_K * 2 + 4 * (x_length + 3 * TILE_N) + (attn.scratch_bytes() if attends else 0)
            + SMEM_SLACK)
    if smem > SMEM_BYTES:
        raise ValueError(f"concurrent={concurrent} needs ~{smem} bytes of shared memory a CTA (32 KB a slot, "
                         f"{4 * x_length} for x{', ~74 KB for attention' if attends else ''}), over the "
                         f"{SMEM_BYTES} a Hopper CTA has: use fewer slots")
    kernel = plgpu.kernel(
        lambda *refs: _kernel(*refs, layer_phases=tuple(layer_phases), final_phases=tuple(final_phases),
                              shapes=shapes, vectors=vectors, offsets=offsets, layers=layers, ctas=ctas,
                              concurrent=concurrent, eps=eps, interpret=interpret),
        out_type=(), grid=(ctas,), grid_names=("sm",), num_threads=2, thread_name="wg",
        scratch_types=[plgpu.SMEM((x_length,), jnp.float32), plgpu.SMEM((TILE_N,), jnp.float32),
                       plgpu.SMEM((2 * TILE_N,), jnp.float32), attn.scratch_types() if attends else [],
                       plgpu.SMEM((concurrent, TILE_N, TILE_K), jnp.bfloat16, transforms=TRANSFORMS),
                       plgpu.Barrier(num_barriers=concurrent), plgpu.Barrier(num_barriers=concurrent)],
        interpret=_interpret_params() if interpret else None, kernel_name="decode_step")
    kernel(*weights, norms, cache if uses_cache else (), workspace)
    acts = workspace[...]
    return {name: acts[offsets[name]:offsets[name] + v.n * v.rows].reshape(v.rows, v.n) for name, v in vectors.items()}


def _check_cache(cache, layers: int):
    shapes = None if cache is None or len(cache) != 4 else [(tuple(a.shape), a.dtype) for a in cache]
    if (shapes is None or len(shapes[0][0]) != 4 or shapes[0][0][0] != layers or shapes[0][0][3] != attn.HEAD_DIM
            or shapes[0][0][1] % attn.BLOCK or shapes[1] != shapes[0] or shapes[0][1] != jnp.bfloat16
            or shapes[2] != ((1,), jnp.int32) or shapes[3] != ((2, attn.HEAD_DIM // 2), jnp.float32)):
        raise ValueError(f"attention needs cache=(k, v, pos, rope): k and v bfloat16 [layers={layers}, T, "
                         f"kv heads, {attn.HEAD_DIM}] with T % {attn.BLOCK} == 0, pos int32 [1], rope float32 "
                         f"[2, {attn.HEAD_DIM // 2}]; got (shape, dtype) {shapes}")


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public name yet
    return InterpretGPUParams()
