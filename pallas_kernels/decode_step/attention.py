"""Decode attention inside the persistent step (Pallas Mosaic GPU): one kv head on one warpgroup.

For kv head g of a GQA layer with heads of 64 dims (G q heads a kv head: Llama 1.1B's 32 over 4
have G = 8, Llama 3.2 1B's 32 over 8 have G = 4), with the group's q heads and the new k
already rotated (by the q|k|v phase: `Phase.rope`): softmax attention over the layer's cache
positions [0, pos) and the new token. Scores and outputs are [64, 64] wgmma tiles whose rows
r < G and G + r are q head G g + r (the twin rows carry the log-sum-exp out beside the output in
one staging; the other rows are zero: batch 1 leaves the tensor cores idle anyway). On the last
split the new token goes first, as an extra chunk whose only unmasked key is its own k at row
2 G, so the running max is finite from the start; then 64-position chunks of the cache stream
in by TMA through a ring of `slots` buffers, masked past pos.

Written against interpret mode's limits as well as Hopper's: p goes to the MMA from registers on
the GPU but through shared memory in interpret mode (whose wgmma takes A only from there), and
every P V product starts from a fresh accumulator, added in registers.
"""
import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

HEAD_DIM = 64
BLOCK = 64  # cache positions per chunk
X_ROWS = 72  # rows of the fp32 staging: a [64, 64] tile read from row 1 (v below k) still fits
SWIZZLE = 128
TRANSFORMS = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class AttnScratch:
    """Shared memory and barriers the unit uses while it runs (`scratch_types`, in field order)."""
    x: object         # fp32 [X_ROWS, 64] register <-> layout staging (unswizzled)
    q_tile: object    # bf16 [64, 64]     swizzled, wgmma A
    k_new: object     # bf16 [64, 64]     swizzled, the extra K tile, then p
    v_new: object     # bf16 [64, 64]     swizzled, the extra V tile
    k_slots: object   # bf16 [S, 64, 64]  swizzled, cache K chunks
    v_slots: object   # bf16 [S, 64, 64]  swizzled, cache V chunks
    k_bar: object     # Barrier(num_barriers=S)
    v_bar: object     # Barrier(num_barriers=S)


def scratch_bytes(slots: int = 2) -> int:
    """Bytes of `scratch_types(slots)` (before alignment)."""
    return 4 * X_ROWS * HEAD_DIM + 2 * BLOCK * HEAD_DIM * (3 + 2 * slots)


def scratch_types(slots: int = 2):
    """The unit's scratch (~74 KB at 2 slots), in AttnScratch field order."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    return [
        plgpu.SMEM((X_ROWS, HEAD_DIM), f32),
        plgpu.SMEM((BLOCK, HEAD_DIM), bf16, transforms=TRANSFORMS),
        plgpu.SMEM((BLOCK, HEAD_DIM), bf16, transforms=TRANSFORMS),
        plgpu.SMEM((BLOCK, HEAD_DIM), bf16, transforms=TRANSFORMS),
        plgpu.SMEM((slots, BLOCK, HEAD_DIM), bf16, transforms=TRANSFORMS),
        plgpu.SMEM((slots, BLOCK, HEAD_DIM), bf16, transforms=TRANSFORMS),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
    ]


def check_heads(q_heads, kv_heads: int):
    """Raise ValueError unless the unit takes this GQA shape: G = q_heads / kv_heads a whole even
    number (a group's 64-entry rows move as WG_STRIDED arrays, whole multiples of 128 entries),
    with the group's rows, their twins, k and v in one 64-row tile (2 G + 2 <= 64)."""
    group = q_heads / kv_heads if kv_heads > 0 else 0.5
    if not (group == int(group) and group > 0 and group % 2 == 0 and 2 * group + 2 <= BLOCK):
        raise ValueError(f"attention takes an even number G of q heads a kv head with 2 G + 2 <= {BLOCK}; "
                         f"got {q_heads:g} q heads over {kv_heads} kv heads")


def _iota(dim):
    return plgpu.broadcasted_iota(jnp.int32, (BLOCK, HEAD_DIM), dim, layout=plgpu.Layout.WGMMA)


def _load_wgmma(ref):
    # optimized=False: the staging buffer is also accessed with WG_STRIDED layouts, so it must stay
    # untiled/unswizzled, and no "optimized" WGMMA transfer exists for that (layout inference then
    # fails, or in the full unit searches for many minutes).
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA, optimized=False)


def chunk_range(n_chunks, split, splits):
    """The cache chunks [first, end) of one split: whole shares of ceil(n_chunks / splits)."""
    share = (n_chunks + splits - 1) // splits
    first = split * share
    return first, jnp.minimum(n_chunks, first + share)


def attention_unit(g, split, splits: int, qkv, k_cache, v_cache, pos, out, new_kv, s: AttnScratch,
                   p_in_registers: bool = False):
    """Attention of q heads G g .. G g + G - 1 over kv head g, split `split` of `splits` of the
    cache (`chunk_range`; the last split also takes the new token). g, split and pos (the new
    token's position, read once a step by the caller: a load here would put a round trip first
    on the unit's path) are traced ints (Python ints unroll and layout inference slows to
    minutes). The shapes name the heads: k_cache and v_cache [T, K, 64], qkv [(Q + 2 K) 64] (Q q
    heads, G = Q / K, `check_heads`); qkv, out and new_kv are fp32 vectors in global memory,
    new_kv [2 K 64] getting (k, v) of head g at 128 g. With one split, out [Q 64] gets the output;
    with more, out [2 splits, Q 64] gets partials: row `split` the split's normalised output, row
    splits + split its log2-sum-exp2 of the scaled scores per head, repeated over the head's 64
    entries (-inf, with a zero output, for a split with no positions). p_in_registers: P V's
    wgmma takes p from registers (Hopper), not through shared memory (interpret mode's wgmma
    reads A only there)."""
    kv_heads = k_cache.shape[1]
    q_heads = qkv.shape[0] // HEAD_DIM - 2 * kv_heads
    per_kv = q_heads // kv_heads  # G
    new_row = 2 * per_kv  # row (= key column) of the new token in the extra K / V tile
    slots = s.k_slots.shape[0]
    n_chunks = lax.div(pos + (BLOCK - 1), BLOCK)
    first, end = chunk_range(n_chunks, split, splits)
    count = jnp.maximum(end - first, 0)

    def fetch(chunk, slot):
        plgpu.copy_gmem_to_smem(k_cache.at[pl.ds(chunk * BLOCK, BLOCK), g], s.k_slots.at[slot], s.k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_cache.at[pl.ds(chunk * BLOCK, BLOCK), g], s.v_slots.at[slot], s.v_bar.at[slot])

    for i in range(slots):  # the cache chunks stream in while the new token is prepared
        pl.when(i < count)(lambda i=i: fetch(first + i, i))

    # 1. The features into rows of x: rows 0..G-1 and G..2G-1 the q heads, row 2G k, 2G+1 v. Plain
    #    loads (the caller's grid barrier gives acquire semantics), reshaped as values: interpret
    #    mode rejects ref reshapes. A WG_STRIDED array needs a multiple of 128 elements, so k and
    #    v come as 128-entry windows ending at them, stored v first so that k's window overwrites
    #    v's other half, and q's twin last over k's; all three loads go out before the first
    #    store (one round trip).
    strided = lambda shape: plgpu.Layout.WG_STRIDED(shape, vec_size=1)
    group = per_kv * HEAD_DIM

    def window(start, rows):  # qkv[start : start + rows] as [rows // 64, 64]
        return plgpu.load(qkv.at[pl.ds(start, rows)], layout=strided((rows,))).reshape(rows // HEAD_DIM, HEAD_DIM)

    k_at, v_at = q_heads * HEAD_DIM, (q_heads + kv_heads) * HEAD_DIM  # where k and v start in qkv
    v_rows = window(v_at + (g - 1) * HEAD_DIM, 2 * HEAD_DIM)  # (the entries before, v_g)
    k_rows = window(k_at + (g - 1) * HEAD_DIM, 2 * HEAD_DIM)  # (the entries before, k_g)
    q = window(g * group, group)
    s.x[pl.ds(new_row, 2)] = v_rows
    s.x[pl.ds(new_row - 1, 2)] = k_rows
    s.x[pl.ds(per_kv, per_kv)] = q
    s.x[pl.ds(0, per_kv)] = q
    plgpu.commit_smem()

    # 2. The q tile (scaled) -> swizzled bf16; on the last split, which takes the new token,
    #    also its K / V tiles and new_kv <- (k, v) (one writer a head).
    row = _iota(0)
    xr = _load_wgmma(s.x.at[pl.ds(0, BLOCK)])
    s.q_tile[...] = jnp.where(row < 2 * per_kv, xr * (1.0 / math.sqrt(HEAD_DIM)), 0.0).astype(jnp.bfloat16)
    takes_new = split == splits - 1

    @pl.when(takes_new)
    def _():
        new_kv.at[pl.ds(g * 2 * HEAD_DIM, 2 * HEAD_DIM)][...] = plgpu.load(
            s.x.at[pl.ds(new_row, 2)], layout=strided((2, HEAD_DIM))).reshape(2 * HEAD_DIM)
        s.k_new[...] = jnp.where(row == new_row, xr, 0.0).astype(jnp.bfloat16)
        xv = _load_wgmma(s.x.at[pl.ds(1, BLOCK)])  # row new_row of this view is x's next row: v
        s.v_new[...] = jnp.where(row == new_row, xv, 0.0).astype(jnp.bfloat16)

    plgpu.commit_smem()

    # 3. Online softmax over [new token] + cache chunks.
    col = _iota(1)

    def step(k_tile, v_tile, mask, carry):
        acc, m, l = carry

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, s.q_tile, k_tile.T)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        sc = pl.run_scoped(qk, plgpu.ACC((BLOCK, BLOCK), jnp.float32))
        sc = jnp.where(mask, sc * LOG2E, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing unmasked yet stays 0
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_safe, sc.shape, [0]))
        l = l * alpha + p.sum(axis=1)

        # p from registers, or through SMEM (the k_new tile, free once the first step's QK is
        # done) for interpret mode. And a fresh zero accumulator, added in registers:
        # run_state(ACC.init(acc)) discharges to a `wgmma` primitive interpret mode cannot run.
        p = p.astype(jnp.bfloat16)
        if not p_in_registers:
            s.k_new[...] = p
            plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p if p_in_registers else s.k_new, v_tile)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pl.run_scoped(pv, plgpu.ACC((BLOCK, HEAD_DIM), jnp.float32))
        return acc, m_new, l

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    carry = (plgpu.layout_cast(jnp.zeros((BLOCK, HEAD_DIM), jnp.float32), plgpu.Layout.WGMMA),
             plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), row_layout),
             plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), row_layout))
    # The new token goes to the last split, which has the fewest cache chunks (`chunk_range`);
    # the others skip its step.
    carry = lax.cond(takes_new, lambda c: step(s.k_new, s.v_new, col == new_row, c), lambda c: c, carry)

    def chunk_body(i, carry):
        chunk, slot = first + i, lax.rem(i, slots)
        plgpu.barrier_wait(s.k_bar.at[slot])
        plgpu.barrier_wait(s.v_bar.at[slot])
        v_tile = s.v_slots.at[slot]

        @pl.when(chunk == n_chunks - 1)
        def _():  # zero V rows at positions >= pos: p is 0 there, but 0 * NaN garbage is NaN
            v = plgpu.load(v_tile, layout=plgpu.Layout.WGMMA)
            v_tile[...] = jnp.where(_iota(0) + chunk * BLOCK < pos, v, jnp.zeros_like(v))
            plgpu.commit_smem()

        carry = step(s.k_slots.at[slot], v_tile, col + chunk * BLOCK < pos, carry)
        # wgmma_wait(0) above: the slot's reads are done, refill it.
        pl.when(i + slots < count)(lambda: fetch(chunk + slots, slot))
        return carry

    acc, m, l = lax.fori_loop(0, count, chunk_body, carry)

    # 4. Normalise; rows 0..G-1 -> out[64 (G g + h) + d] (of row `split`) and, with splits, the
    #    twin rows G..2G-1 as the log-sum-exp (of row splits + split), from one staging in x.
    total = q_heads * HEAD_DIM
    l_rows = lax.broadcast_in_dim(l, acc.shape, [0])
    tile = jnp.where(l_rows > 0, acc / l_rows, 0.0)
    if splits > 1:
        tile = jnp.where(row < per_kv, tile, lax.broadcast_in_dim(m + jnp.log2(l), acc.shape, [0]))
    plgpu.commit_smem()  # every thread is done reading x
    s.x[pl.ds(0, BLOCK)] = tile
    plgpu.commit_smem()
    stores = [(0, split * total if splits > 1 else 0)]  # (first row of x, offset in out)
    if splits > 1:
        stores.append((per_kv, (splits + split) * total))
    for first_row, at in stores:
        out.at[pl.ds(at + g * group, group)][...] = plgpu.load(
            s.x.at[pl.ds(first_row, per_kv)], layout=strided((per_kv, HEAD_DIM))).reshape(group)
