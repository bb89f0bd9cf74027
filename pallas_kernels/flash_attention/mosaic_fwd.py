"""Flash-attention forward in Pallas Mosaic GPU for Hopper: FlashAttention-3 style.

FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608, sections 3.1-3.2): a CTA runs
`MosaicBlocks.compute_wgs` (2 or 3) compute warpgroups and one memory warpgroup. Each compute
warpgroup owns `block_q` query rows (wgmma needs M = 64 per warpgroup); the memory warpgroup
streams K and V tiles by TMA into `max_concurrent_steps` shared-memory slots guarded by barriers
("producer-consumer"). Schedule barriers make the compute warpgroups take turns ("ping-pong"):
one runs its softmax while another's wgmma runs. With `MosaicBlocks.overlap` each compute
warpgroup also pipelines its own steps (FA3 3.2): it issues step j's Q K^T and step j-1's P V
together and runs step j's softmax while P V is in flight. Three compute warpgroups (FA3's 192-row
tile at head_dim 64) take turns round-robin and need overlap.
The layout follows the upstream `jax/experimental/pallas/ops/gpu/attention_mgpu.py`; unlike it,
shared memory holds the input dtype (bf16 or fp16), ragged lengths are padded here and masked,
the logit scale is applied, and wgmma accumulators are `pl.run_scoped` (CPU-interpretable).

Saves the same base-2 log-sum-exp as the Triton forward, so the Triton backward serves both.
B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_trace
from pallas_kernels.flash_attention.config import MosaicBlocks
from pallas_kernels.flash_attention.triton_fwd import LOG2E
from pallas_kernels.norms.config import sm_count

# setmaxnreg split per thread, (compute, memory), by compute warpgroups. An SM has 64K 32-bit
# registers: 512 a thread of a 128-thread warpgroup summed over the CTA's warpgroups, so
# compute_wgs * compute + memory <= 512, each a multiple of 8. 2 (3 warpgroups): upstream
# attention_mgpu's 232 / 40 (504); 3 (4 warpgroups, 128 a thread at launch): FA3's 160 / 32 for
# three MMA warpgroups (512).
REGISTERS = {2: (232, 40), 3: (160, 32)}
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma would round fp32 to tf32


def _pad_seq(x, length):
    """Zero-pad axis 1 (sequence) of [B, L, heads, H] up to `length`."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _online_softmax(s, m, l, qk_scale):
    """One step of the online softmax in base 2 over scores s [block_q, block_kv] fp32.
    m holds scaled row maxima, so exp2(s * qk_scale - m) is one FMA per logit.
    Returns (m_new, alpha = exp2(m - m_new), p, l_new = l * alpha + rowsum(p))."""
    m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
    return m_new, alpha, p, l * alpha + p.sum(axis=1)


def _mask(s, j, q_start, *, causal, seq_kv):
    """s with the keys of step j a row may not see set to -inf: later positions (causal) or the
    padding past seq_kv. Each row keeps key 0 or its diagonal key, so no row is all -inf."""
    bq, bkv = s.shape
    rows = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
    cols = j * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
    return jnp.where((rows >= cols) if causal else (cols < seq_kv), s, -jnp.inf)


def _rows_times(x, r):
    """x [block_q, H] with row i multiplied by r[i]."""
    return x * lax.broadcast_in_dim(r, x.shape, [0])


def _pv_wgmma(o_ref, scaled, p16, v_tile, p_smem):
    """Issue o_ref = scaled + P V (P [block_q, block_kv] 16-bit, v_tile an SMEM ref). On the GPU
    the accumulator is seeded with `scaled` and P stays in registers; in interpret mode (p_smem
    given) P goes through SMEM and the accumulator starts at zero: returns what the caller adds to
    o_ref's result (scaled there, None on the GPU)."""
    if p_smem is None:
        o_ref[...] = scaled
        plgpu.wgmma(o_ref, p16, v_tile)
        return None
    p_smem[...] = p16
    plgpu.commit_smem()
    plgpu.wgmma(o_ref, p_smem, v_tile)
    return scaled


def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
            k_full, v_full, q_full, k_free, v_free, schedule, *p_smem2, scale, causal, seq_kv,
            group, blocks):
    """One CTA: W * block_q query rows of one (batch, query head), W = blocks.compute_wgs;
    `wg` 0 .. W-1 compute, W copies.

    q_ref, out_ref [B, Tp, N, H] and k_ref, v_ref [B, Sp, K, H] in GMEM (sequence padded);
    lse_ref [B, N, Tp] fp32. SMEM: qo_smem2 [W, block_q, H] (q, then the output), k_smem and
    v_smem [slots, block_kv, H], lse_smem2 [W, block_q] fp32. Barriers: k_full, v_full (TMA
    landed, per slot), q_full (per warpgroup), k_free, v_free (all compute warpgroups are done
    with a slot), schedule (ping-pong, W = 2: one two-arrival barrier; with blocks.overlap one
    barrier per warpgroup, its turn to issue wgmma). p_smem2 [W, block_q, block_kv]: only in
    interpret mode, whose wgmma reads operands from SMEM only; on the GPU P stays in registers
    (FA3 3.1).
    """
    bq, bkv, slots = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
    wgs = blocks.compute_wgs
    compute_regs, memory_regs = REGISTERS[wgs]
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    tile = lax.axis_index("q_tiles")
    if causal:  # CTAs start in grid order: the last query tiles (the most K/V steps) go first,
        tile = q_ref.shape[1] // (wgs * bq) - 1 - tile  # so the tail wave is light ones
    cta_start = tile * (wgs * bq)
    n_kv = k_ref.shape[1] // bkv
    cta_steps = tile_steps(cta_start, wgs * bq, bkv, n_kv, causal)

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_regs, action="increase")
        qo_smem = qo_smem2.at[wg]
        q_start = cta_start + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], qo_smem, q_full.at[wg])
        _compute_tile(qo_smem, lse_smem2.at[wg], k_smem, v_smem, k_full, v_full, q_full.at[wg], k_free,
                      v_free, schedule, p_smem2[0].at[wg] if p_smem2 else None, out_ref, lse_ref,
                      batch=batch, head=head, wg=wg, q_start=q_start, cta_steps=cta_steps, base=0,
                      scale=scale, causal=causal, seq_kv=seq_kv, blocks=blocks)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
        plgpu.set_max_registers(memory_regs, action="decrease")
        kv_head = lax.div(head, group)

        def load(j, ref, smem, full):
            plgpu.copy_gmem_to_smem(ref.at[batch, pl.ds(j * bkv, bkv), kv_head],
                                    smem.at[lax.rem(j, slots)], full.at[lax.rem(j, slots)])

        for j in range(min(slots, n_kv)):
            @pl.when(j < cta_steps)
            def _():
                load(j, k_ref, k_smem, k_full)
                load(j, v_ref, v_smem, v_full)

        # K and V of a slot are released at different times (with overlap, V one step later):
        # each is refilled as soon as its own slot is free.
        @pl.loop(slots, cta_steps)
        def _(j):
            plgpu.barrier_wait(k_free.at[lax.rem(j, slots)])
            load(j, k_ref, k_smem, k_full)
            plgpu.barrier_wait(v_free.at[lax.rem(j, slots)])
            load(j, v_ref, v_smem, v_full)

        @pl.loop(jnp.maximum(cta_steps - slots, 0), cta_steps)
        def _(j):  # drain: observe every release phase
            plgpu.barrier_wait(k_free.at[lax.rem(j, slots)])
            plgpu.barrier_wait(v_free.at[lax.rem(j, slots)])


def tile_steps(cta_start, rows, bkv, n_kv, causal):
    """K/V steps a tile of `rows` query rows from cta_start needs: causal stops at the block
    holding its last row's diagonal."""
    return lax.div(cta_start + rows + bkv - 1, bkv) if causal else n_kv


def warpgroup_steps(q_start, bq, bkv, n_kv, causal, seq_kv):
    """(K/V steps, first step that needs a key mask) of one warpgroup's bq query rows from
    q_start. Causal: the blocks before the first masked one lie wholly below the diagonal;
    full: only a ragged last block needs its keys masked."""
    first_masked = lax.div(q_start, bkv) if causal else seq_kv // bkv
    return tile_steps(q_start, bq, bkv, n_kv, causal), first_masked


@mosaic_trace.region("tile")
def _compute_tile(qo_smem, lse_smem, k_smem, v_smem, k_full, v_full, q_ready, k_free, v_free,
                  schedule, p_smem, out_ref, lse_ref, *, batch, head, wg, q_start, cta_steps, base,
                  scale, causal, seq_kv, blocks, opens=True, closes=True):
    """One compute warpgroup's block_q rows of a tile from q_start: the K/V loop (ping-pong or
    overlapped; `opens` / `closes` as in _overlapped_loop), then O and the base-2 log-sum-exp
    through qo_smem / lse_smem to GMEM. The stores are issued, not awaited."""
    bq, bkv = blocks.block_q, blocks.block_kv
    steps, first_masked = warpgroup_steps(q_start, bq, bkv, cta_steps, causal, seq_kv)
    loop = (functools.partial(_overlapped_loop, wgs=blocks.compute_wgs, opens=opens, closes=closes)
            if blocks.overlap else _ping_pong_loop)
    acc, m, l = loop(
        qo_smem, k_smem, v_smem, k_full, v_full, q_ready, k_free, v_free, schedule, p_smem, wg=wg,
        steps=steps, first_masked=first_masked, cta_steps=cta_steps, qk_scale=scale * LOG2E,
        mask=functools.partial(_mask, q_start=q_start, causal=causal, seq_kv=seq_kv),
        slots=blocks.max_concurrent_steps, base=base)
    with jax.named_scope("epilogue"):
        qo_smem[...] = _rows_times(acc, 1.0 / l).astype(qo_smem.dtype)
        lse_smem[...] = m + jnp.log(l) * (1 / math.log(2))  # base-2 log-sum-exp
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_start, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, bq)])


def _persistent_kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem4, k_smem, v_smem, lse_smem2,
                       k_full, v_full, q_full, k_free, v_free, schedule, q_free, *p_smem2, scale,
                       causal, seq_kv, group, blocks, num_ctas):
    """`_kernel` as a persistent CTA (`MosaicBlocks.persistent`; FA3's tile scheduler, static):
    CTA c runs tiles c, c + num_ctas, ... of the (head, query tile, batch) grid, head fastest,
    causal in reverse query-tile order as `_kernel`'s grid. The memory warpgroup runs ahead across
    tiles: it loads the next tile's Q (two buffers, by tile parity) and first K/V steps while the
    compute warpgroups finish the current one, and the output's store to GMEM is not awaited
    before the next tile starts (only its read of SMEM). The K/V slots and every barrier's phase
    run on from tile to tile: `base` counts the CTA's K/V steps before the tile.

    Refs as in `_kernel`, except q_smem4 [2, W, block_q, H] (Q, then the output, by tile parity),
    q_full [2 * W] (Q landed, by parity and warpgroup) and q_free [2] (all compute warpgroups
    are done with a parity's buffers)."""
    bq, bkv, slots = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
    wgs = blocks.compute_wgs
    compute_regs, memory_regs = REGISTERS[wgs]
    batches, heads = out_ref.shape[0], out_ref.shape[2]
    q_tiles = q_ref.shape[1] // (wgs * bq)
    n_kv = k_ref.shape[1] // bkv
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    my_tiles = lax.div(heads * q_tiles * batches - cta + num_ctas - 1, num_ctas)

    def tile_of(i):
        """(batch, head, first query row, K/V steps) of this CTA's i-th tile."""
        tile = cta + i * num_ctas
        head, rest = lax.rem(tile, heads), lax.div(tile, heads)
        q_tile, batch = lax.rem(rest, q_tiles), lax.div(rest, q_tiles)
        if causal:  # the tiles with the most K/V steps first, as in _kernel
            q_tile = q_tiles - 1 - q_tile
        cta_start = q_tile * (wgs * bq)
        return batch, head, cta_start, tile_steps(cta_start, wgs * bq, bkv, n_kv, causal)

    @pl.when(wg < wgs)
    def _compute():
        plgpu.set_max_registers(compute_regs, action="increase")

        def tile_body(i, base):
            batch, head, cta_start, cta_steps = tile_of(i)
            parity = lax.rem(i, 2)
            _compute_tile(q_smem4.at[parity, wg], lse_smem2.at[wg], k_smem, v_smem, k_full, v_full,
                          q_full.at[parity * wgs + wg], k_free, v_free, schedule,
                          p_smem2[0].at[wg] if p_smem2 else None, out_ref, lse_ref, batch=batch,
                          head=head, wg=wg, q_start=cta_start + wg * bq, cta_steps=cta_steps,
                          base=base, scale=scale, causal=causal, seq_kv=seq_kv, blocks=blocks,
                          opens=i == 0, closes=i == my_tiles - 1)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # SMEM read: free to reuse
            plgpu.barrier_arrive(q_free.at[parity])
            return base + cta_steps

        lax.fori_loop(0, my_tiles, tile_body, 0)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _memory():
        plgpu.set_max_registers(memory_regs, action="decrease")

        def tile_body(i, base):
            batch, head, cta_start, cta_steps = tile_of(i)
            parity = lax.rem(i, 2)

            @pl.when(i >= 2)
            def _():  # tile i - 2, the last user of this parity's buffers, is done with them
                plgpu.barrier_wait(q_free.at[parity])

            for w in range(wgs):
                plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(cta_start + w * bq, bq), head],
                                        q_smem4.at[parity, w], q_full.at[parity * wgs + w])
            kv_head = lax.div(head, group)

            @pl.loop(0, cta_steps)
            def _(j):
                g = base + j  # the CTA's step: its slot, and after the first `slots`, a release
                for ref, smem, full, free in ((k_ref, k_smem, k_full, k_free),
                                              (v_ref, v_smem, v_full, v_free)):
                    pl.when(g >= slots)(lambda free=free: plgpu.barrier_wait(free.at[lax.rem(g, slots)]))
                    plgpu.copy_gmem_to_smem(ref.at[batch, pl.ds(j * bkv, bkv), kv_head],
                                            smem.at[lax.rem(g, slots)], full.at[lax.rem(g, slots)])
            return base + cta_steps

        total = lax.fori_loop(0, my_tiles, tile_body, 0)

        @pl.loop(jnp.maximum(total - slots, 0), total)
        def _(g):  # drain: observe every release phase
            plgpu.barrier_wait(k_free.at[lax.rem(g, slots)])
            plgpu.barrier_wait(v_free.at[lax.rem(g, slots)])

        @pl.loop(jnp.maximum(my_tiles - 2, 0), my_tiles)
        def _(i):
            plgpu.barrier_wait(q_free.at[lax.rem(i, 2)])


def _ping_pong_loop(qo_smem, k_smem, v_smem, k_full, v_full, q_ready, k_free, v_free, schedule,
                    p_smem, *, wg, steps, first_masked, cta_steps, qk_scale, mask, slots, base):
    """The K/V loop of one compute warpgroup, ping-pong only (FA3 3.1): per step, S = Q K^T and
    its softmax, then O = alpha O + P V (accumulated in place), each wgmma awaited at once; a
    two-arrival barrier makes the warpgroups take turns, so one's softmax overlaps the other's
    wgmma: two compute warpgroups only (MosaicBlocks rejects compute_wgs=3 without overlap).
    q_ready: the barrier of this warpgroup's Q tile; base: the CTA's K/V steps before this tile
    (a persistent CTA's slots and their barrier phases run on across tiles). Returns (O, m, l)."""
    bq, head_dim = qo_smem.shape
    bkv = k_smem.shape[1]
    dtype = qo_smem.dtype

    @mosaic_trace.region("take_turns")
    def take_turns():  # ping-pong: arrive, then wait until the other warpgroup arrives too
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    plgpu.barrier_wait(q_ready)
    plgpu.barrier_wait(k_full.at[lax.rem(base, slots)])
    pl.when(wg == 1)(take_turns)  # warpgroup 0 goes first

    @mosaic_trace.region("step")
    def step(j, carry, masked):
        acc, m, l = carry  # [block_q, H], [block_q], [block_q] fp32
        slot = lax.rem(base + j, slots)

        def qk_matmul(acc_ref):
            plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
            take_turns()
            return acc_ref[...]

        s = pl.run_scoped(qk_matmul, plgpu.ACC((bq, bkv), jnp.float32))  # [block_q, block_kv]
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            s = mask(s, j)
        m_new, alpha, p, l = _online_softmax(s, m, l, qk_scale)
        # O's rescale is done here, in this warpgroup's softmax phase, not in its wgmma turn.
        scaled, p16 = _rows_times(acc, alpha), p.astype(dtype)
        if p_smem is None and head_dim <= 128:
            # Pin this work before the turn (upstream attention_mgpu measured that it matters).
            scaled, l, m_new, p16 = lax.optimization_barrier((scaled, l, m_new, p16))
        plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may use the MMAs
        plgpu.barrier_wait(v_full.at[slot])
        plgpu.barrier_wait(schedule)

        def pv_matmul(o_ref):
            rest = _pv_wgmma(o_ref, scaled, p16, v_smem.at[slot], p_smem)

            @pl.when(j + 1 < steps)
            def _():
                plgpu.barrier_wait(k_full.at[lax.rem(base + j + 1, slots)])
            o = o_ref[...]
            return o if rest is None else rest + o

        acc = pl.run_scoped(pv_matmul, plgpu.ACC((bq, head_dim), jnp.float32))  # [block_q, H]
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

    carry = lax.fori_loop(0, jnp.minimum(first_masked, steps),
                          functools.partial(step, masked=False), (acc, m, l))
    acc, m, l = lax.fori_loop(jnp.minimum(first_masked, steps), steps,
                              functools.partial(step, masked=True), carry)

    @pl.loop(steps, cta_steps)  # causal: pass over the steps only the other warpgroup needs
    def _(j):
        _release_unused_step(base + j, k_full, v_full, k_free, v_free, slots)
        take_turns()
        take_turns()

    pl.when(wg == 0)(take_turns)
    return acc, m, l


def _release_unused_step(g, k_full, v_full, k_free, v_free, slots):
    """Observe the K/V arrivals of the CTA's step g and release its slot without using it
    (causal: a step only other compute warpgroups need)."""
    slot = lax.rem(g, slots)
    plgpu.barrier_wait(k_full.at[slot])
    plgpu.barrier_wait(v_full.at[slot])
    plgpu.barrier_arrive(k_free.at[slot])
    plgpu.barrier_arrive(v_free.at[slot])


def _overlapped_loop(qo_smem, k_smem, v_smem, k_full, v_full, q_ready, k_free, v_free, turn,
                     p_smem, *, wg, wgs, steps, first_masked, cta_steps, qk_scale, mask,
                     slots, base, opens=True, closes=True):
    """The K/V loop of one compute warpgroup with FA3's intra-warpgroup overlap (section 3.2) on
    top of ping-pong. Step j issues S_j = Q K_j^T, then O += P_{j-1} V_{j-1} (O rescaled first),
    and runs the softmax of S_j while that P V wgmma is still in flight:

        issue S_0; softmax(S_0)
        for j in 1 .. steps-1: issue S_j; O *= alpha_{j-1}; issue O += P_{j-1} V_{j-1};
                               await S_j; softmax(S_j) -> P_j, alpha_j; await O
        O *= alpha_last; issue O += P_last V_last; await O

    Ping-pong: `turn` [wgs] holds one single-arrival barrier per warpgroup; a warpgroup waits on
    its own before issuing a step's wgmma and arrives on the next one's, (wg + 1) % wgs, after, so
    the warpgroups issue strictly round-robin (0, 1, .., wgs-1, 0, ...) and each one's softmax
    overlaps the others' wgmma. Every warpgroup issues cta_steps + 1 times (causal: all but the
    last warpgroup pass their turns over the steps only later warpgroups need). Warpgroup 0 skips
    its first wait and the last warpgroup its last arrival, so turn[0] sees cta_steps arrivals
    and waits, every other turn[w] cta_steps + 1 of each. A persistent CTA keeps one ring over
    all its tiles: only the tile that `opens` it skips that wait, only the one that `closes` it
    that arrival (else warpgroup 0 could pass a turn of the next tile before the last
    warpgroup has taken its last one of this tile). q_ready, base: as in _ping_pong_loop.
    Returns (O, m, l)."""
    bq, head_dim = qo_smem.shape
    bkv = k_smem.shape[1]
    dtype = qo_smem.dtype

    @mosaic_trace.region("wait_turn")
    def wait_turn():
        plgpu.barrier_wait(turn.at[wg])

    def pass_turn():
        plgpu.barrier_arrive(turn.at[lax.rem(wg + 1, wgs)])

    def slot(j):
        return lax.rem(base + j, slots)

    def pv_issue(o_ref, acc, alpha, p16, j):
        """Issue O = alpha * acc + P_j V_j into o_ref; returns what to add to o_ref's result."""
        scaled = _rows_times(acc, alpha)
        plgpu.barrier_wait(v_full.at[slot(j)])
        return _pv_wgmma(o_ref, scaled, p16, v_smem.at[slot(j)], p_smem)

    def s_issue(s_ref, j):
        plgpu.barrier_wait(k_full.at[slot(j)])
        plgpu.wgmma(s_ref, qo_smem, k_smem.at[slot(j)].transpose((1, 0)))

    plgpu.barrier_wait(q_ready)

    @mosaic_trace.region("first_step")
    def first_step(s_ref):
        pl.when(jnp.logical_or(wg != 0, jnp.logical_not(opens)))(wait_turn)  # warpgroup 0 opens
        s_issue(s_ref, 0)
        pass_turn()
        s = s_ref[...]
        plgpu.barrier_arrive(k_free.at[slot(0)])
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        m, alpha, p, l = _online_softmax(mask(s, 0), m, l, qk_scale)  # step 0: masked always
        return m, l, alpha, p.astype(dtype)

    m, l, alpha, p16 = pl.run_scoped(first_step, plgpu.ACC((bq, bkv), jnp.float32))
    acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)

    @mosaic_trace.region("step")
    def step(j, carry, masked):
        acc, m, l, alpha, p16 = carry  # acc: steps < j-1; p16: P_{j-1}; alpha: alpha_{j-1}

        def issue_and_softmax(s_ref, o_ref):
            wait_turn()
            s_issue(s_ref, j)
            rest = pv_issue(o_ref, acc, alpha, p16, j - 1)
            pass_turn()
            s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_j landed; P V may still run
            plgpu.barrier_arrive(k_free.at[slot(j)])
            m_new, alpha_new, p, l_new = _online_softmax(mask(s, j) if masked else s, m, l,
                                                         qk_scale)
            p16_new = p.astype(dtype)
            o = o_ref[...]
            return (o if rest is None else rest + o), m_new, l_new, alpha_new, p16_new

        carry = pl.run_scoped(issue_and_softmax, plgpu.ACC((bq, bkv), jnp.float32),
                              plgpu.ACC((bq, head_dim), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot(j - 1)])
        return carry

    unmasked_end = jnp.maximum(jnp.minimum(first_masked, steps), 1)
    carry = lax.fori_loop(1, unmasked_end, functools.partial(step, masked=False),
                          (acc, m, l, alpha, p16))
    acc, m, l, alpha, p16 = lax.fori_loop(unmasked_end, steps,
                                          functools.partial(step, masked=True), carry)

    @mosaic_trace.region("last_pv")
    def last_pv(o_ref):
        wait_turn()
        rest = pv_issue(o_ref, acc, alpha, p16, steps - 1)
        # The last warpgroup issues last (it has cta_steps steps): nobody waits for its turn
        # unless a next tile follows.
        pl.when(jnp.logical_or(wg != wgs - 1, jnp.logical_not(closes)))(pass_turn)
        o = o_ref[...]
        return o if rest is None else rest + o

    acc = pl.run_scoped(last_pv, plgpu.ACC((bq, head_dim), jnp.float32))
    plgpu.barrier_arrive(v_free.at[slot(steps - 1)])

    @pl.loop(steps, cta_steps)  # causal: pass over the steps only later warpgroups need
    def _(j):
        _release_unused_step(base + j, k_full, v_full, k_free, v_free, slots)
        wait_turn()
        pass_turn()

    return acc, m, l

SMEM_BYTES = 227 * 1024  # shared memory a CTA may allocate on an H100
# Barriers and alignment padding beside the tiles: the H100 compiler counted 232568 bytes for
# tiles of 229888 (block_kv 128, 3 slots, head_dim 128), 2680 more.
SMEM_OVERHEAD_BYTES = 4096


def check_operands(q, direction: str):
    """Raise ValueError unless q is bf16/fp16 with head_dim a multiple of 64 (wgmma tiles)."""
    if jnp.dtype(q.dtype) not in DTYPES or q.shape[-1] % 64:
        raise ValueError(f"mosaic {direction} needs bf16/fp16 and head_dim % 64 == 0; "
                         f"got dtype={q.dtype}, head_dim={q.shape[-1]}")


def check_smem(blocks: MosaicBlocks, head_dim: int, dtype):
    """Raise ValueError if the tiles overflow shared memory (q/out rows, K/V slots, lse)."""
    row_bytes = head_dim * jnp.dtype(dtype).itemsize
    q_buffers = 2 if blocks.persistent else 1
    nbytes = (blocks.compute_wgs * blocks.block_q * (q_buffers * row_bytes + 4)
              + blocks.max_concurrent_steps * blocks.block_kv * 2 * row_bytes + SMEM_OVERHEAD_BYTES)
    if nbytes > SMEM_BYTES:
        raise ValueError(f"mosaic forward tiles {blocks} need {nbytes} bytes of shared memory at "
                         f"head_dim={head_dim}; at most {SMEM_BYTES} fit: use a smaller block_kv "
                         "or fewer max_concurrent_steps")


def flash_forward(q, k, v, *, scale: float, causal: bool, blocks: MosaicBlocks,
                  interpret: bool | str):
    """Forward pass. Returns out [B, T, N, H] (q's dtype) and lse2 [B, N, T] fp32, in base 2.

    Raises:
      ValueError: dtype not bf16/fp16, head_dim not a multiple of 64, or tiles that overflow
        shared memory.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    check_operands(q, "forward")
    check_smem(blocks, h, q.dtype)
    wgs = blocks.compute_wgs
    cta_rows = wgs * blocks.block_q
    if causal:  # T == S; one padded length serves both, so causal step counts stay in bounds
        t_pad = s_pad = _round_up(t, math.lcm(cta_rows, blocks.block_kv))
    else:
        t_pad, s_pad = _round_up(t, cta_rows), _round_up(s, blocks.block_kv)
    q, k, v = _pad_seq(q, t_pad), _pad_seq(k, s_pad), _pad_seq(v, s_pad)
    smem_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    q_buffers = (2,) if blocks.persistent else ()  # by tile parity
    scratch = (
        plgpu.SMEM((*q_buffers, wgs, blocks.block_q, h), q.dtype, transforms=smem_transforms),
        plgpu.SMEM((blocks.max_concurrent_steps, blocks.block_kv, h), q.dtype,
                   transforms=smem_transforms),
        plgpu.SMEM((blocks.max_concurrent_steps, blocks.block_kv, h), q.dtype,
                   transforms=smem_transforms),
        plgpu.SMEM((wgs, blocks.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=blocks.max_concurrent_steps),  # k_full
        plgpu.Barrier(num_barriers=blocks.max_concurrent_steps),  # v_full
        plgpu.Barrier(num_barriers=wgs * (2 if blocks.persistent else 1)),  # q_full
        plgpu.Barrier(num_arrivals=wgs, num_barriers=blocks.max_concurrent_steps),  # k_free
        plgpu.Barrier(num_arrivals=wgs, num_barriers=blocks.max_concurrent_steps),  # v_free
        # schedule: ping-pong, 2 warpgroups (overlap: each warpgroup's turn to issue wgmma)
        plgpu.Barrier(num_barriers=wgs) if blocks.overlap else plgpu.Barrier(num_arrivals=2),
    )
    if blocks.persistent:
        scratch += (plgpu.Barrier(num_arrivals=wgs, num_barriers=2),)  # q_free, by tile parity
    if interpret:
        scratch += (plgpu.SMEM((wgs, blocks.block_q, blocks.block_kv), q.dtype,
                               transforms=smem_transforms),)
    options = dict(scale=scale, causal=causal, seq_kv=s, group=n // kv_heads, blocks=blocks)
    tiles = n * (t_pad // cta_rows) * b
    if blocks.persistent:
        # One CTA per SM; interpreted, two CTAs, so each runs several tiles.
        num_ctas = min(tiles, 2 if interpret else sm_count())
        kernel = functools.partial(_persistent_kernel, **options, num_ctas=num_ctas)
        grid, grid_names = (num_ctas,), ("cta",)
    else:
        kernel = functools.partial(_kernel, **options)
        grid, grid_names = (n, t_pad // cta_rows, b), ("heads", "q_tiles", "batch")
    out, lse2 = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, t_pad, n, h), q.dtype),
                  jax.ShapeDtypeStruct((b, n, t_pad), jnp.float32)),
        grid=grid,
        grid_names=grid_names,
        num_threads=wgs + 1,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=mosaic_trace.compiler_params(approx_math=True),
        # interpret="races" also runs the interpreter's race detector (slower).
        interpret=(plgpu.InterpretGPUParams(detect_races=interpret == "races") if interpret
                   else None),
    )(q, k, v)
    return out[:, :t], lse2[:, :, :t]
