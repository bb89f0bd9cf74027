"""Flash-attention forward in Pallas Mosaic GPU for Hopper: FlashAttention-3 style.

FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608, sections 3.1-3.2): a CTA runs three
warpgroups. Two compute warpgroups each own `block_q` query rows (wgmma needs M = 64 per
warpgroup); one memory warpgroup streams K and V tiles by TMA into `max_concurrent_steps`
shared-memory slots guarded by barriers ("producer-consumer"). A schedule barrier makes the two
compute warpgroups take turns ("ping-pong"): one runs its softmax while the other's wgmma runs.
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

from pallas_kernels.flash_attention.config import MosaicBlocks
from pallas_kernels.flash_attention.triton_fwd import LOG2E

COMPUTE_WGS = 2  # compute warpgroups per CTA; a third one issues the TMA copies
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # wgmma would round fp32 to tf32


def _pad_seq(x, length):
    """Zero-pad axis 1 (sequence) of [B, L, heads, H] up to `length`."""
    if x.shape[1] == length:
        return x
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, qo_smem2, k_smem, v_smem, lse_smem2,
            k_full, v_full, q_full, k_free, v_free, schedule, *p_smem2, scale, causal, seq_kv,
            group, blocks):
    """One CTA: 2 * block_q query rows of one (batch, query head); `wg` 0, 1 compute, 2 copies.

    q_ref, out_ref [B, Tp, N, H] and k_ref, v_ref [B, Sp, K, H] in GMEM (sequence padded);
    lse_ref [B, N, Tp] fp32. SMEM: qo_smem2 [2, block_q, H] (q, then the output), k_smem and
    v_smem [slots, block_kv, H], lse_smem2 [2, block_q] fp32. Barriers: k_full, v_full (TMA
    landed, per slot), q_full (per warpgroup), k_free, v_free (both compute warpgroups are done
    with a slot), schedule (ping-pong). p_smem2 [2, block_q, block_kv]: only in interpret mode,
    whose wgmma reads operands from SMEM only; on the GPU P stays in registers (FA3 3.1).
    """
    bq, bkv, slots = blocks.block_q, blocks.block_kv, blocks.max_concurrent_steps
    head_dim, dtype = qo_smem2.shape[-1], qo_smem2.dtype
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    cta_start = lax.axis_index("q_tiles") * (COMPUTE_WGS * bq)
    n_kv = k_ref.shape[1] // bkv
    # K/V steps the CTA needs: causal stops at the block holding its last row's diagonal.
    cta_steps = (lax.div(cta_start + COMPUTE_WGS * bq + bkv - 1, bkv) if causal else n_kv)
    qk_scale = scale * LOG2E  # base 2: exp(x) = exp2(x log2 e)

    def take_turns():  # ping-pong: arrive, then wait until the other warpgroup arrives too
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
        p_smem = p_smem2[0].at[wg] if p_smem2 else None
        q_start = cta_start + wg * bq
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, bq), head], qo_smem, q_full.at[wg])
        if causal:
            steps = lax.div(q_start + bq + bkv - 1, bkv)
            first_masked = lax.div(q_start, bkv)  # blocks before it lie wholly below the diagonal
        else:
            steps = n_kv
            first_masked = seq_kv // bkv  # only a ragged last block needs its keys masked
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(q_full.at[wg])
        plgpu.barrier_wait(k_full.at[0])
        pl.when(wg == 1)(take_turns)  # warpgroup 0 goes first

        def step(j, carry, masked):
            acc, m, l = carry  # [block_q, H], [block_q], [block_q] fp32
            slot = lax.rem(j, slots)

            def qk_matmul(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                take_turns()
                return acc_ref[...]

            s = pl.run_scoped(qk_matmul, plgpu.ACC((bq, bkv), jnp.float32))  # [block_q, block_kv]
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                rows = q_start + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0,
                                                        layout=plgpu.Layout.WGMMA)
                cols = j * bkv + plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1,
                                                        layout=plgpu.Layout.WGMMA)
                ok = (rows >= cols) if causal else (cols < seq_kv)
                s = jnp.where(ok, s, -jnp.inf)  # each row keeps key 0 or a diagonal key: no NaN
            # m holds scaled maxima so exp2(s * qk_scale - m) is one FMA per logit.
            m_new = jnp.maximum(m, s.max(axis=1) * qk_scale)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may use the MMAs
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(schedule)

            if p_smem is not None:
                p_smem[...] = p16
                plgpu.commit_smem()

            def pv_matmul(acc_ref):
                plgpu.wgmma(acc_ref, p16 if p_smem is None else p_smem, v_smem.at[slot])

                @pl.when(j + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_full.at[lax.rem(j + 1, slots)])
                return acc_ref[...]

            pv = pl.run_scoped(pv_matmul, plgpu.ACC((bq, head_dim), jnp.float32))  # [block_q, H]
            plgpu.barrier_arrive(v_free.at[slot])
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv, m_new, l

        carry = lax.fori_loop(0, jnp.minimum(first_masked, steps),
                              functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(jnp.minimum(first_masked, steps), steps,
                                  functools.partial(step, masked=True), carry)

        @pl.loop(steps, cta_steps)  # causal: pass over the steps only the other warpgroup needs
        def _(j):
            slot = lax.rem(j, slots)
            plgpu.barrier_wait(k_full.at[slot])  # observe every phase, then release the slot
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turns()
            take_turns()

        pl.when(wg == 0)(take_turns)
        qo_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
        lse_smem[...] = m + jnp.log(l) * (1 / math.log(2))  # base-2 log-sum-exp
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(q_start, bq), head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_start, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, group)

        def load(j, slot):
            rows = (batch, pl.ds(j * bkv, bkv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        for j in range(min(slots, n_kv)):
            pl.when(j < cta_steps)(functools.partial(load, j, j))

        def wait_free(j):  # both compute warpgroups are done with step j's slot
            plgpu.barrier_wait(k_free.at[lax.rem(j, slots)])
            plgpu.barrier_wait(v_free.at[lax.rem(j, slots)])

        @pl.loop(slots, cta_steps)
        def _(j):
            wait_free(j - slots)
            load(j, lax.rem(j, slots))

        pl.loop(jnp.maximum(cta_steps - slots, 0), cta_steps)(wait_free)  # drain: see every phase


SMEM_BYTES = 227 * 1024  # shared memory a CTA may allocate on an H100


def check_smem(blocks: MosaicBlocks, head_dim: int, dtype):
    """Raise ValueError if the tiles overflow shared memory (q/out rows, K/V slots, lse)."""
    row_bytes = head_dim * jnp.dtype(dtype).itemsize
    nbytes = (COMPUTE_WGS * blocks.block_q * (row_bytes + 4)
              + blocks.max_concurrent_steps * blocks.block_kv * 2 * row_bytes)
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
    if jnp.dtype(q.dtype) not in DTYPES or h % 64:
        raise ValueError(f"mosaic forward needs bf16/fp16 and head_dim % 64 == 0; "
                         f"got dtype={q.dtype}, head_dim={h}")
    check_smem(blocks, h, q.dtype)
    cta_rows = COMPUTE_WGS * blocks.block_q
    if causal:  # T == S; one padded length serves both, so causal step counts stay in bounds
        t_pad = s_pad = _round_up(t, math.lcm(cta_rows, blocks.block_kv))
    else:
        t_pad, s_pad = _round_up(t, cta_rows), _round_up(s, blocks.block_kv)
    q, k, v = _pad_seq(q, t_pad), _pad_seq(k, s_pad), _pad_seq(v, s_pad)
    smem_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((COMPUTE_WGS, blocks.block_q, h), q.dtype, transforms=smem_transforms),
        plgpu.SMEM((blocks.max_concurrent_steps, blocks.block_kv, h), q.dtype,
                   transforms=smem_transforms),
        plgpu.SMEM((blocks.max_concurrent_steps, blocks.block_kv, h), q.dtype,
                   transforms=smem_transforms),
        plgpu.SMEM((COMPUTE_WGS, blocks.block_q), jnp.float32),
        plgpu.Barrier(num_barriers=blocks.max_concurrent_steps),  # k_full
        plgpu.Barrier(num_barriers=blocks.max_concurrent_steps),  # v_full
        plgpu.Barrier(num_barriers=COMPUTE_WGS),  # q_full
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=blocks.max_concurrent_steps),  # k_free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=blocks.max_concurrent_steps),  # v_free
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),  # schedule
    )
    if interpret:
        scratch += (plgpu.SMEM((COMPUTE_WGS, blocks.block_q, blocks.block_kv), q.dtype,
                               transforms=smem_transforms),)
    kernel = functools.partial(_kernel, scale=scale, causal=causal, seq_kv=s,
                               group=n // kv_heads, blocks=blocks)
    out, lse2 = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, t_pad, n, h), q.dtype),
                  jax.ShapeDtypeStruct((b, n, t_pad), jnp.float32)),
        grid=(n, t_pad // cta_rows, b),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        # interpret="races" also runs the interpreter's race detector (slower).
        interpret=(plgpu.InterpretGPUParams(detect_races=interpret == "races") if interpret
                   else None),
    )(q, k, v)
    return out[:, :t], lse2[:, :, :t]
