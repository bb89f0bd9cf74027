"""Flash-attention backward in Pallas Mosaic GPU for Hopper: FlashAttention-2/3 style.

FlashAttention-2 (arXiv:2307.08691, algorithm 2) split in two kernels, so neither needs atomics:
  dQ kernel: a CTA owns 2 * block_q query rows of one (batch, query head), one compute
    warpgroup per block_q rows; K and V tiles stream through shared memory and both compute
    warpgroups read each tile.
  dK/dV kernel: a CTA owns 2 * block_kv key rows of one (batch, kv head), one compute warpgroup
    per block_kv rows; Q, dO, lse and delta tiles of every query head of the GQA group stream
    through shared memory, so dK and dV are summed over the group in registers.
In both a third warpgroup issues the TMA copies into `max_concurrent_steps` slots guarded by
barriers (FlashAttention-3, arXiv:2407.08608, section 3.1: producer-consumer): `*_full` (the
copies of a slot landed) and `*_free` (both compute warpgroups are done with a slot).

MosaicBwdBlocks.one_pass drops the dQ kernel (FlashAttention-3's backward, 5 matmuls a block
pair instead of 7): each dK/dV step also forms dQ = dS K for its query block. The two compute
warpgroups put their dS^T in SMEM (double-buffered by step parity, a barrier between them), each
multiplies both by K's half of the head dim that is its own, and adds that [block_q, H / 2]
fp32 partial into a zeroed fp32 buffer by TMA reduction; the caller scales and casts it. The
order of those additions varies, so dQ is not bitwise reproducible from run to run. In
interpret mode, which has no TMA reductions, each CTA writes its partials to a slice of its own
and the caller sums the slices.

Both recompute P = exp2(s * scale * log2 e - lse2) from the forward's base-2 lse, with
delta = rowsum(dO * O): dS = P * (dO V^T - delta), dV = P^T dO, dK = scale * dS^T Q,
dQ = scale * dS K. The dK/dV kernel works on transposed tiles, key rows first (S^T = K Q^T), so
P^T and dS^T come out of wgmma as the left operands of dV and dK without a transpose.

Ragged lengths are padded. Padded query rows get lse2 = +inf, so their P is exactly 0 (and dO,
delta are 0): they add nothing to dK, dV. Padded keys are zero rows of K and V; they only
touch their own (discarded) dK/dV rows, and the dQ kernel masks the ragged last K/V block (its
P might overflow). Causal: blocks wholly above the diagonal are skipped, diagonal blocks masked.

In interpret mode (CPU) wgmma reads its operands from shared memory only and cannot start from
a given accumulator: the register operands (dS, P^T, dS^T) are staged through SMEM there and
accumulation happens after the product. On the GPU they stay in registers (FA3 section 3.1).
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
from pallas_kernels.flash_attention.config import MosaicBwdBlocks
from pallas_kernels.flash_attention import mosaic_fwd
from pallas_kernels.flash_attention.triton_fwd import LOG2E

COMPUTE_WGS = 2  # compute warpgroups per CTA of both kernels; a third one issues the TMA copies
# Registers a thread of each compute warpgroup / of the memory warpgroup: the forward's 232 / 40.
# The one-pass dK/dV kernel keeps a third accumulator (dQ) live and spills at 232 (ptxas: 140-424
# bytes a thread): FA3's 240 / 24 measured 1-6% faster there on an H200 (B4 T4k and B1 T16k,
# full and causal); the two-kernel backward gained nothing from it.
REGISTERS = mosaic_fwd.REGISTERS[COMPUTE_WGS]
ONE_PASS_REGISTERS = (240, 24)


def _matmuls(*products, staged):
    """[init + a @ b for (init, a, b) in products] in fp32 by wgmma, issued together and awaited
    once. init: an fp32 [M, N] value or None (zeros); a: an SMEM ref or a WGMMA-layout value;
    b: an SMEM ref. staged (interpret mode): accumulators start at zero, init is added after."""
    def issue(*acc_refs):
        for acc_ref, (init, a, b) in zip(acc_refs, products):
            if init is not None and not staged:
                acc_ref[...] = init
            plgpu.wgmma(acc_ref, a, b)
        return [acc_ref[...] for acc_ref in acc_refs]

    accs = [plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32) for _, a, b in products]
    outs = pl.run_scoped(issue, *accs)
    if staged:
        outs = [out if init is None else init + out for out, (init, _, _) in zip(outs, products)]
    return outs


def _probs_and_dp(s_operands, dp_operands, probs):
    """(probs(S), dP) for S = a @ b and dP = c @ d (SMEM operands, fp32 from zero): both issued
    by wgmma at once, and probs (the softmax recompute's exp2) runs as soon as S lands, while
    dP's wgmma is still in flight (FlashAttention-3's backward order; on an H200 it took 3-6% off
    the one-pass fwd+bwd at 4k-8k full attention and 5% off the two-kernel one at 8k causal).
    No other wgmma group may be pending on entry: the wait for S counts dP's as the only one."""
    def issue(s_acc, dp_acc):
        plgpu.wgmma(s_acc, *s_operands)
        plgpu.wgmma(dp_acc, *dp_operands)
        p = probs(plgpu.wgmma_accumulator_load(s_acc, wait_n=1))
        return p, plgpu.wgmma_accumulator_load(dp_acc)

    accs = [plgpu.ACC((a.shape[0], b.shape[1]), jnp.float32) for a, b in (s_operands, dp_operands)]
    return pl.run_scoped(issue, *accs)


def _operand(x, staging):
    """x as a wgmma left operand: itself (registers), or written to the SMEM ref `staging`."""
    if staging is None:
        return x
    staging[...] = x
    plgpu.commit_smem()
    return staging


def _stream(load, n_steps, max_steps, slots, free):
    """Memory warpgroup: load(j, slot) for steps j in [0, n_steps) into slot j % slots, each once
    both compute warpgroups released the step before it in that slot; then observe the last
    releases (every barrier phase is waited on). max_steps: a static bound on n_steps."""
    for j in range(min(slots, max_steps)):
        pl.when(j < n_steps)(functools.partial(load, j, j))

    @pl.loop(slots, n_steps)
    def _(j):
        plgpu.barrier_wait(free.at[lax.rem(j - slots, slots)])
        load(j, lax.rem(j, slots))

    @pl.loop(jnp.maximum(n_steps - slots, 0), n_steps)
    def _(j):
        plgpu.barrier_wait(free.at[lax.rem(j, slots)])


def _wgmma_iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2,
               lse_smem2, delta_smem2, k_smem, v_smem, rows_full, k_full, v_full, kv_free,
               *staging, scale, causal, seq_kv, group, blocks):
    """One CTA: 2 * block_q query rows of one (batch, query head); `wg` 0, 1 compute, 2 copies.

    q_ref, do_ref, dq_ref [B, Tp, N, H], k_ref, v_ref [B, Sp, K, H] in GMEM (sequence padded);
    lse_ref, delta_ref [B, N, Tp] fp32. SMEM: q_smem2, do_smem2 [2, block_q, H] (q becomes dq at
    the end), lse_smem2, delta_smem2 [2, block_q] fp32, k_smem, v_smem [slots, block_kv, H].
    Barriers: rows_full (a warpgroup's four row copies landed), k_full, v_full (per slot),
    kv_free (both compute warpgroups are done with a slot). staging [2, block_q, block_kv] (dS
    of each compute warpgroup): interpret mode only.
    """
    bq, bkv, slots = blocks.block_q_dq, blocks.block_kv_dq, blocks.max_concurrent_steps
    dtype = q_smem2.dtype
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_start = lax.axis_index("q_tiles") * (COMPUTE_WGS * bq)
    n_kv = k_ref.shape[1] // bkv
    cta_steps = mosaic_fwd.tile_steps(cta_start, COMPUTE_WGS * bq, bkv, n_kv, causal)
    qk_scale = scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    @mosaic_trace.region("tile")
    def _compute():
        plgpu.set_max_registers(REGISTERS[0], action="increase")
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        staged = bool(staging)
        ds_smem = staging[0].at[wg] if staged else None
        q_start = cta_start + wg * bq
        rows = (batch, pl.ds(q_start, bq), head)
        row_stats = (batch, head, pl.ds(q_start, bq))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, rows_full.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, rows_full.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[row_stats], lse_smem2.at[wg], rows_full.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[row_stats], delta_smem2.at[wg], rows_full.at[wg])
        steps, first_masked = mosaic_fwd.warpgroup_steps(q_start, bq, bkv, n_kv, causal, seq_kv)
        plgpu.barrier_wait(rows_full.at[wg])
        lse2 = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))  # [block_q]
        delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
        dq = plgpu.layout_cast(jnp.zeros(q_smem.shape, jnp.float32), plgpu.Layout.WGMMA)

        @mosaic_trace.region("step")
        def step(j, dq, masked):  # dq [block_q, H] fp32
            slot = lax.rem(j, slots)
            k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]  # [block_kv, H]
            plgpu.barrier_wait(k_full.at[slot])
            plgpu.barrier_wait(v_full.at[slot])
            def probs(s):  # [block_q, block_kv]
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse2, s.shape, [0]))
                if not masked:
                    return p
                q_pos = q_start + _wgmma_iota(s.shape, 0)
                k_pos = j * bkv + _wgmma_iota(s.shape, 1)
                return jnp.where((q_pos >= k_pos) if causal else (k_pos < seq_kv), p, 0.0)

            p, dp = _probs_and_dp((q_smem, k_tile.transpose((1, 0))),
                                  (do_smem, v_tile.transpose((1, 0))), probs)
            ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
            dq, = _matmuls((dq, _operand(ds.astype(dtype), ds_smem), k_tile), staged=staged)
            plgpu.barrier_arrive(kv_free.at[slot])
            return dq

        dq = lax.fori_loop(0, jnp.minimum(first_masked, steps),
                           functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(jnp.minimum(first_masked, steps), steps,
                           functools.partial(step, masked=True), dq)

        @pl.loop(steps, cta_steps)  # causal: pass over the steps only the other warpgroup needs
        def _(j):
            slot = lax.rem(j, slots)
            plgpu.barrier_wait(k_full.at[slot])  # observe every phase, then release the slot
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(kv_free.at[slot])

        q_smem[...] = (dq * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(REGISTERS[1], action="decrease")
        kv_head = lax.div(head, group)

        def load(j, slot):
            rows = (batch, pl.ds(j * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        _stream(load, cta_steps, n_kv, slots, kv_free)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, scale, causal, seq_kv,
                group, blocks, interpret):
    """One CTA: 2 * block_kv key rows of one (batch, kv head), summed over its G query heads.

    q_ref, do_ref [B, Tp, N, H], k_ref, v_ref, dk_ref, dv_ref [B, Sp, K, H] in GMEM;
    lse_ref, delta_ref [B, N, Tp] fp32. SMEM: k_smem2, v_smem2 [2, block_kv, H] (they become
    dk, dv at the end), q_smem, do_smem [slots, block_q, H], lse_smem, delta_smem [slots,
    block_q] fp32. Barriers: kv_full (a warpgroup's K and V landed), q_full (Q and lse of a
    slot), do_full (dO and delta of a slot), rows_free (both compute warpgroups are done with a
    slot). staging [2, 2, block_kv, block_q] (P^T and dS^T of each compute warpgroup):
    interpret mode only.

    blocks.one_pass adds, first among refs, dq_ref: fp32 [B, Tp, N, H], zeros on entry, which
    each step's dQ partial is added to by TMA reduction (interpret mode, which has no TMA
    reductions: [kv tiles, B, Tp, N, H], one slice per CTA, written once per row and summed by
    the caller); and, after the barriers, ds_smem [2, 2, block_kv, block_q] (each warpgroup's
    dS^T by step parity), dq_smem [2, block_q, H / 2] fp32 (each warpgroup's half of dQ's
    columns) and the barrier ds_ready [2] (both warpgroups wrote a parity's dS^T).
    """
    one_pass = blocks.one_pass
    registers = ONE_PASS_REGISTERS if one_pass else REGISTERS
    ragged_keys = not causal and seq_kv < k_ref.shape[1]  # causal: T == S, padded keys are masked
    dq_ref, refs = (refs[0], refs[1:]) if one_pass else (None, refs)
    (dk_ref, dv_ref, k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, kv_full, q_full,
     do_full, rows_free, *rest) = refs
    ds_smem, dq_smem, ds_ready, *staging = rest if one_pass else (None, None, None, *rest)
    bq, bkv, slots = blocks.block_q_dkv, blocks.block_kv_dkv, blocks.max_concurrent_steps
    dtype = k_smem2.dtype
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    cta_start = lax.axis_index("kv_tiles") * (COMPUTE_WGS * bkv)
    n_q = q_ref.shape[1] // bq
    # Causal: query blocks before first_q lie wholly above the diagonal of every key here.
    first_q = lax.div(cta_start, bq) if causal else 0
    per_head = n_q - first_q  # steps per query head; head g takes steps [g, g + 1) * per_head
    qk_scale = scale * LOG2E

    @pl.when(wg < COMPUTE_WGS)
    @mosaic_trace.region("tile")
    def _compute():
        plgpu.set_max_registers(registers[0], action="increase")
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        staged = bool(staging)
        p_smem, ds_t_smem = (staging[0].at[0, wg], staging[0].at[1, wg]) if staged else (None, None)
        kv_start = cta_start + wg * bkv
        rows = (batch, pl.ds(kv_start, bkv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, kv_full.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, kv_full.at[wg])
        # Query blocks from `visible` on see every key of this warpgroup: no mask.
        visible = jnp.minimum(lax.div(kv_start + bkv - 1 + bq - 1, bq), n_q) if causal else 0
        zeros = plgpu.layout_cast(jnp.zeros(k_smem.shape, jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(kv_full.at[wg])
        if one_pass:  # dQ reads the other warpgroup's K tile too
            plgpu.barrier_wait(kv_full.at[1 - wg])

        dq_cols = pl.ds(wg * (k_smem.shape[1] // 2), k_smem.shape[1] // 2)  # this wg's half

        def issue_dq(acc_ref, ds_pair):
            """dQ[:, dq_cols] of the step's query block += dS K over the CTA's 2 * block_kv keys:
            dS^T of both warpgroups from SMEM, transposed, times their K tiles. Returns how many
            wgmma groups it issued."""
            for w in range(COMPUTE_WGS):
                plgpu.wgmma(acc_ref, ds_pair.at[w].transpose((1, 0)), k_smem2.at[w, :, dq_cols])
            return COMPUTE_WGS

        def store_dq(dq, rows, head):
            """Add this warpgroup's fp32 dQ partial [block_q, H / 2] into dq_ref by TMA."""
            dq_stage = dq_smem.at[wg]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's copy read dq_stage
            dq_stage[...] = dq
            plgpu.commit_smem()
            if interpret:  # this CTA's own slice; each (rows, head, cols) is written once
                dst = dq_ref.at[lax.axis_index("kv_tiles"), batch, rows, head, dq_cols]
                plgpu.copy_smem_to_gmem(dq_stage, dst)
            else:
                plgpu.copy_smem_to_gmem(dq_stage, dq_ref.at[batch, rows, head, dq_cols],
                                        reduction_op="add")

        def one_pass_matmuls(dk, dv, p_t, ds_t, q_tile, do_tile, parity, slot):
            """dV += P^T dO, dK += dS^T Q and, once the other warpgroup's dS^T landed, this
            step's dQ partial: all in flight together; the Q/dO slot is released as soon as dV
            and dK are done (interpret mode: one product at a time)."""
            ds_pair = ds_smem.at[parity]
            dq_shape = (q_tile.shape[0], dq_smem.shape[2])
            if staged:
                dv, dk = _matmuls((dv, p_t, do_tile), (dk, ds_t, q_tile), staged=True)
                plgpu.barrier_arrive(rows_free.at[slot])
                plgpu.barrier_wait(ds_ready.at[parity])

                def issue_alone(dq_acc):
                    issue_dq(dq_acc, ds_pair)
                    return dq_acc[...]
                return dk, dv, pl.run_scoped(issue_alone, plgpu.ACC(dq_shape, jnp.float32))

            def issue(dv_acc, dk_acc, dq_acc):
                dv_acc[...], dk_acc[...] = dv, dk
                plgpu.wgmma(dv_acc, p_t, do_tile)
                plgpu.wgmma(dk_acc, ds_t, q_tile)
                plgpu.barrier_wait(ds_ready.at[parity])
                dq_groups = issue_dq(dq_acc, ds_pair)
                # wgmma groups retire in order: with only dQ's pending, dV and dK are done
                dk_out = plgpu.wgmma_accumulator_load(dk_acc, wait_n=dq_groups)
                dv_out = plgpu.wgmma_accumulator_load(dv_acc, wait_n=None)
                plgpu.barrier_arrive(rows_free.at[slot])
                return dk_out, dv_out, dq_acc[...]

            return pl.run_scoped(issue, *(plgpu.ACC(shape, jnp.float32)
                                          for shape in (dv.shape, dk.shape, dq_shape)))

        @mosaic_trace.region("step")
        def step(i, carry, g, masked):  # query block i of the group's query head g
            dk, dv = carry  # [block_kv, H] fp32 each
            step_index = g * per_head + i - first_q  # both compute warpgroups count alike
            slot = lax.rem(step_index, slots)
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]  # [block_q, H]
            plgpu.barrier_wait(q_full.at[slot])
            plgpu.barrier_wait(do_full.at[slot])

            def probs(s_t):  # [block_kv, block_q]
                lse2 = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse2, s_t.shape, [1]))
                if masked:
                    k_pos = kv_start + _wgmma_iota(s_t.shape, 0)
                    q_pos = i * bq + _wgmma_iota(s_t.shape, 1)
                    return jnp.where(q_pos >= k_pos, p_t, 0.0)
                if one_pass and ragged_keys:
                    # Padded keys (zero rows of K, V) only touch their own discarded dK/dV rows,
                    # but dQ reads their dS: P there can overflow (0 * inf is NaN): zeroed.
                    return jnp.where(kv_start + _wgmma_iota(s_t.shape, 0) < seq_kv, p_t, 0.0)
                return p_t

            # wgmma order a step: S^T and dP^T, then dV and dK (one_pass: and dQ).
            p_t, dp_t = _probs_and_dp((k_smem, q_tile.transpose((1, 0))),
                                      (v_smem, do_tile.transpose((1, 0))), probs)
            delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, p_t.shape, [1]))
            p_t, ds_t = p_t.astype(dtype), ds_t.astype(dtype)
            if one_pass:  # publish dS^T: dQ reads both warpgroups'
                parity = lax.rem(step_index, 2)
                ds_smem.at[parity, wg][...] = ds_t
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[parity])
            p_t, ds_t = _operand(p_t, p_smem), _operand(ds_t, ds_t_smem)
            if not one_pass:
                dv, dk = _matmuls((dv, p_t, do_tile), (dk, ds_t, q_tile), staged=staged)
                plgpu.barrier_arrive(rows_free.at[slot])
                return dk, dv
            dk, dv, dq = one_pass_matmuls(dk, dv, p_t, ds_t, q_tile, do_tile, parity, slot)
            store_dq(dq, pl.ds(i * bq, bq), kv_head * group + g)
            return dk, dv

        def head_steps(g, carry):  # query head g of the group: diagonal blocks, then the rest
            carry = lax.fori_loop(first_q, visible, functools.partial(
                step, g=g, masked=True), carry)
            return lax.fori_loop(jnp.maximum(visible, first_q), n_q, functools.partial(
                step, g=g, masked=False), carry)

        dk, dv = lax.fori_loop(0, group, head_steps, (zeros, zeros))
        if one_pass:  # the other warpgroup's last dQ product reads this K tile: wait for it
            done = ds_ready.at[lax.rem(group * per_head, 2)]
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
        k_smem[...] = (dk * scale).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(registers[1], action="decrease")

        def load(j, slot):
            head = kv_head * group + lax.div(j, per_head)
            start = (first_q + lax.rem(j, per_head)) * bq
            rows, row_stats = (batch, pl.ds(start, bq), head), (batch, head, pl.ds(start, bq))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_full.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[row_stats], lse_smem.at[slot], q_full.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_full.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[row_stats], delta_smem.at[slot], do_full.at[slot])

        _stream(load, group * per_head, group * n_q, slots, rows_free)


SMEM_BYTES = 227 * 1024  # shared memory a CTA may allocate on an H100


def _smem_bytes(*buffers: int) -> int:
    """Shared memory of scratch buffers of these sizes: Pallas starts each at a 1 KiB boundary;
    plus 1 KiB for the barriers."""
    return sum(-(-nbytes // 1024) * 1024 for nbytes in buffers) + 1024


def check_smem(blocks: MosaicBwdBlocks, head_dim: int, dtype):
    """Raise ValueError if a kernel's tiles overflow shared memory (the buffers flash_backward
    allocates on a GPU)."""
    slots = blocks.max_concurrent_steps
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = head_dim * itemsize
    bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
    # K, V of each compute warpgroup; Q, dO, lse, delta slots
    dkv = [COMPUTE_WGS * bkv * row_bytes] * 2 + [slots * bq * row_bytes] * 2 + [slots * bq * 4] * 2
    if blocks.one_pass:  # dS^T of both warpgroups by step parity, their fp32 dQ halves
        if head_dim != 128:
            raise ValueError(f"mosaic backward one_pass needs head_dim=128 (each warpgroup adds "
                             f"64 of dQ's columns); got head_dim={head_dim}")
        dkv += [2 * COMPUTE_WGS * bkv * bq * itemsize, COMPUTE_WGS * bq * head_dim // 2 * 4]
        needs = {"dK/dV": _smem_bytes(*dkv)}
    else:  # dQ kernel: Q, dO, lse, delta of each compute warpgroup; K, V slots
        bq_dq = blocks.block_q_dq
        needs = {"dK/dV": _smem_bytes(*dkv), "dQ": _smem_bytes(
            *[COMPUTE_WGS * bq_dq * row_bytes] * 2, *[COMPUTE_WGS * bq_dq * 4] * 2,
            *[slots * blocks.block_kv_dq * row_bytes] * 2)}
    for kernel, nbytes in needs.items():
        if nbytes > SMEM_BYTES:
            raise ValueError(f"mosaic backward tiles {blocks} need {nbytes} bytes of shared memory "
                             f"in the {kernel} kernel at head_dim={head_dim}; at most {SMEM_BYTES} "
                             "fit: use smaller blocks or fewer max_concurrent_steps")


def _pad_to(x, axis: int, multiple: int, value=0.0):
    """Pad `axis` of x with `value` up to a multiple of `multiple`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, -x.shape[axis] % multiple)
    return jnp.pad(x, widths, constant_values=value)


def flash_backward(q, k, v, out, lse2, dout, *, scale: float, causal: bool,
                   blocks: MosaicBwdBlocks, interpret: bool | str):
    """Gradients (dq, dk, dv) in the dtypes of q, k, v; lse2 [B, N, T] is the forward's base-2 lse.

    Raises:
      ValueError: dtype not bf16/fp16, head_dim not a multiple of 64 (one_pass: not 128), or
        tiles that overflow shared memory.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    mosaic_fwd.check_operands(q, "backward")
    check_smem(blocks, h, q.dtype)
    slots = blocks.max_concurrent_steps
    q_rows = math.lcm(COMPUTE_WGS * blocks.block_q_dq, blocks.block_q_dkv)
    kv_rows = math.lcm(blocks.block_kv_dq, COMPUTE_WGS * blocks.block_kv_dkv)
    if causal:  # T == S; one padded length, so causal step counts stay in bounds
        q_rows = kv_rows = math.lcm(q_rows, kv_rows)
    # delta = rowsum(dO * O) [B, N, T] fp32. Padded rows: lse2 = +inf makes their P exactly 0.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    delta, lse2 = _pad_to(delta, 2, q_rows), _pad_to(lse2, 2, q_rows, jnp.inf)
    q, dout = _pad_to(q, 1, q_rows), _pad_to(dout, 1, q_rows)
    k, v = _pad_to(k, 1, kv_rows), _pad_to(v, 1, kv_rows)
    t_pad, s_pad = q.shape[1], k.shape[1]
    group = n // kv_heads
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tiles = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=transforms)  # noqa: E731
    common = dict(
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=mosaic_trace.compiler_params(approx_math=True),
        # interpret="races" also runs the interpreter's race detector (slower).
        interpret=(plgpu.InterpretGPUParams(detect_races=interpret == "races") if interpret
                   else None),
    )

    dq = None if blocks.one_pass else _dq_call(  # one_pass: the dK/dV kernel forms dQ
        q, k, v, dout, lse2, delta, s, group, tiles, common, scale=scale, causal=causal,
        blocks=blocks, interpret=interpret)

    bq, bkv = blocks.block_q_dkv, blocks.block_kv_dkv
    kv_tiles = s_pad // (COMPUTE_WGS * bkv)
    operands = (q, k, v, dout, lse2, delta)
    scratch = (
        tiles(COMPUTE_WGS, bkv, h), tiles(COMPUTE_WGS, bkv, h),  # K, V (then dk, dv)
        tiles(slots, bq, h), tiles(slots, bq, h),  # q, dO
        plgpu.SMEM((slots, bq), jnp.float32), plgpu.SMEM((slots, bq), jnp.float32),  # lse, delta
        plgpu.Barrier(num_arrivals=2, num_barriers=COMPUTE_WGS),  # kv_full: K, V
        plgpu.Barrier(num_arrivals=2, num_barriers=slots),  # q_full: q, lse
        plgpu.Barrier(num_arrivals=2, num_barriers=slots),  # do_full: dO, delta
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),  # rows_free
    )
    if blocks.one_pass:
        # fp32 dQ sums start at zero: a mutable array the kernel adds into (interpret mode: one
        # slice per key tile, summed below).
        dq_sums = jax.new_ref(jnp.zeros(((kv_tiles,) if interpret else ()) + q.shape, jnp.float32))
        operands += (dq_sums,)
        scratch += (tiles(2, COMPUTE_WGS, bkv, bq),  # dS^T by step parity
                    # each half of dQ, fp32, in 128-byte swizzled rows (no bank conflicts
                    # when stored from the wgmma layout)
                    plgpu.SMEM((COMPUTE_WGS, bq, h // 2), jnp.float32, transforms=(
                        plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2))  # ds_ready
    scratch += (tiles(2, COMPUTE_WGS, bkv, bq),) if interpret else ()  # P^T, dS^T staging
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, seq_kv=s, group=group,
                          blocks=blocks, interpret=bool(interpret)),
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(kv_heads, kv_tiles, b),
        grid_names=("heads", "kv_tiles", "batch"),
        scratch_types=scratch,
        **common,
    )(*operands)
    if blocks.one_pass:
        sums = dq_sums[...]
        dq = ((sums.sum(0) if interpret else sums) * scale).astype(q.dtype)
    return dq[:, :t], dk[:, :s], dv[:, :s]


def _dq_call(q, k, v, dout, lse2, delta, seq_kv, group, tiles, common, *, scale, causal, blocks,
             interpret):
    """The dQ kernel over padded operands (see flash_backward)."""
    b, t_pad, n, h = q.shape
    slots = blocks.max_concurrent_steps
    bq, bkv = blocks.block_q_dq, blocks.block_kv_dq
    scratch = (
        tiles(COMPUTE_WGS, bq, h), tiles(COMPUTE_WGS, bq, h),  # q (then dq), dO
        plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32), plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
        tiles(slots, bkv, h), tiles(slots, bkv, h),  # K, V
        plgpu.Barrier(num_arrivals=4, num_barriers=COMPUTE_WGS),  # rows_full: q, dO, lse, delta
        plgpu.Barrier(num_barriers=slots),  # k_full
        plgpu.Barrier(num_barriers=slots),  # v_full
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),  # kv_free
    ) + ((tiles(COMPUTE_WGS, bq, bkv),) if interpret else ())  # dS staging
    return plgpu.kernel(
        functools.partial(_dq_kernel, scale=scale, causal=causal, seq_kv=seq_kv, group=group,
                          blocks=blocks),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(n, t_pad // (COMPUTE_WGS * bq), b),
        grid_names=("heads", "q_tiles", "batch"),
        scratch_types=scratch,
        **common,
    )(q, k, v, dout, lse2, delta)
