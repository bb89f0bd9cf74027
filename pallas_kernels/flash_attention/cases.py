"""Named attention shapes shared by the contract test and the benchmark.

B batch, T query length, S key length, N query heads, K kv heads, H head dim.
"""
import dataclasses
import zlib

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.config import BlockSizes, MosaicBlocks, MosaicBwdBlocks


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq_q: int
    seq_kv: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    segmented: bool = False  # random packed-sequence segment_ids
    blocks: BlockSizes | None = None  # None: the default heuristic

    def inputs(self, dtype):
        """Fresh random q, k, v, a cotangent dout, and segment_ids (or None), seeded by the name."""
        keys = jax.random.split(jax.random.key(zlib.crc32(self.name.encode())), 5)
        q_shape = (self.batch, self.seq_q, self.heads, self.head_dim)
        kv_shape = (self.batch, self.seq_kv, self.kv_heads, self.head_dim)
        q = jax.random.normal(keys[0], q_shape, dtype)
        k = jax.random.normal(keys[1], kv_shape, dtype)
        v = jax.random.normal(keys[2], kv_shape, dtype)
        dout = jax.random.normal(keys[3], q_shape, dtype)
        segment_ids = None
        if self.segmented:  # segments of random length (about 1 in 8 tokens starts a new one)
            starts = jax.random.bernoulli(keys[4], 0.125, (self.batch, self.seq_q))
            segment_ids = jnp.cumsum(starts, axis=1).astype(jnp.int32)
        return q, k, v, dout, segment_ids


# Small enough for interpret mode on one CPU core; odd lengths, every GQA ratio, both masks.
# Tiles forced small and unequal in one case so several blocks, diagonal blocks that are
# partly masked, and ragged tails all occur at tiny sizes.
_UNEVEN = BlockSizes(block_q=32, block_kv=16, block_q_dq=16, block_kv_dq=32,
                     block_q_dkv=32, block_kv_dkv=16)
CPU_CASES = (
    Case("t1_causal", 1, 1, 1, 2, 1, 64, causal=True),
    Case("t17_s72_gqa2_full", 2, 17, 72, 4, 2, 64),
    Case("t129_mha_causal_d128", 1, 129, 129, 2, 2, 128, causal=True),
    Case("t77_mqa_causal_uneven_tiles", 2, 77, 77, 4, 1, 64, causal=True, blocks=_UNEVEN),
    Case("t50_segments_causal", 2, 50, 50, 4, 2, 64, causal=True, segmented=True,
          blocks=_UNEVEN),
    Case("t1000_gqa2_full", 1, 1000, 1000, 4, 2, 64),
)

# The Mosaic forward and backward in GPU interpret mode (a simulator: ~10 s a kernel on CPU).
# 64-key steps in the causal case give more steps than K/V slots, and warpgroups with unequal
# step counts.
MOSAIC_CPU_CASES = (
    CPU_CASES[1],
    Case("t300_gqa2_causal_kv64", 1, 300, 300, 4, 2, 64, causal=True,
         blocks=BlockSizes(mosaic=MosaicBlocks(block_kv=64))),
)

# The Mosaic forward alone with intra-warpgroup overlap (interpret mode): a ragged last key block
# (masked step after an unmasked one), and causal with 64-key steps (unequal step counts per
# warpgroup, more steps than slots, 3 slots).
MOSAIC_OVERLAP_CPU_CASES = (
    Case("t17_s72_gqa2_full_overlap", 2, 17, 72, 4, 2, 64,
         blocks=BlockSizes(mosaic=MosaicBlocks(block_kv=64, overlap=True))),
    Case("t300_gqa2_causal_kv64_slots3_overlap", 1, 300, 300, 4, 2, 64, causal=True,
         blocks=BlockSizes(mosaic=MosaicBlocks(block_kv=64, max_concurrent_steps=3, overlap=True))),
)

# The persistent Mosaic forward (interpreted: two CTAs, each walking several tiles), ping-pong and
# overlap: GQA with T != S over 2 x 4 tiles (a ragged key block), and causal with 64-key steps and
# 3 slots (step counts that differ from tile to tile, slots and barrier phases carried across).
MOSAIC_PERSISTENT_CPU_CASES = tuple(
    case
    for overlap in (False, True)
    for case in (
        Case(f"t17_s72_gqa2_full_persistent{'_overlap' * overlap}", 2, 17, 72, 4, 2, 64,
             blocks=BlockSizes(mosaic=MosaicBlocks(block_kv=64, overlap=overlap, persistent=True))),
        Case(f"t300_gqa2_causal_kv64_slots3_persistent{'_overlap' * overlap}", 1, 300, 300, 4, 2, 64,
             causal=True, blocks=BlockSizes(mosaic=MosaicBlocks(
                 block_kv=64, max_concurrent_steps=3, overlap=overlap, persistent=True))),
    )
)

# The Mosaic backward kernels alone in interpret mode (fed the reference's output and lse), beside
# the forward-and-backward cases above (GQA, T != S, causal): MQA at H=128 and length 1, and MHA
# at length 129 (ragged, two CTAs, more K/V steps than slots).
MOSAIC_BWD_CPU_CASES = (
    Case("t1_mqa_causal_d128", 1, 1, 1, 4, 1, 128, causal=True),
    Case("t129_mha_full", 1, 129, 129, 2, 2, 64),
    # One-pass backward (head_dim 128): ragged full GQA, and causal over two query heads a group.
    Case("t130_gqa2_full_one_pass", 1, 130, 130, 2, 1, 128,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(one_pass=True))),
    Case("t200_gqa2_causal_one_pass", 1, 200, 200, 4, 2, 128, causal=True,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(one_pass=True))),
)

# Real sizes for the GPU run of the same contract (H=8 heads, kv_heads 1/2/8).
GPU_CASES = (
    Case("gpu_t1_causal", 2, 1, 1, 8, 1, 128, causal=True),
    Case("gpu_t17_gqa2_full", 2, 17, 17, 8, 2, 64),
    Case("gpu_t129_mha_causal", 2, 129, 129, 8, 8, 128, causal=True),
    Case("gpu_t1000_mqa_full", 2, 1000, 1000, 8, 1, 128),
    Case("gpu_t1000_gqa2_causal_d64", 2, 1000, 1000, 8, 2, 64, causal=True),
    Case("gpu_t2048_mha_causal", 2, 2048, 2048, 8, 8, 128, causal=True),
    Case("gpu_t1024_s3000_gqa2_full", 2, 1024, 3000, 8, 2, 128),
    Case("gpu_t4096_segments_causal", 1, 4096, 4096, 8, 2, 128, causal=True, segmented=True),
    Case("gpu_t4096_mqa_full_d64", 1, 4096, 4096, 8, 1, 64),
    # Mosaic backward tiles other than the default: 128-key dQ steps, 128-row dK/dV steps.
    Case("gpu_t1000_gqa2_causal_bwd_tiles", 2, 1000, 1000, 8, 2, 128, causal=True,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(block_kv_dq=128, block_q_dkv=128))),
    Case("gpu_t600_mqa_full_bwd_slots3", 1, 600, 700, 8, 1, 128,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(max_concurrent_steps=3))),
    # The one-pass backward: ragged GQA full with T != S, and causal MHA.
    Case("gpu_t1000_s1300_gqa2_full_one_pass", 2, 1000, 1300, 8, 2, 128,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(one_pass=True))),
    Case("gpu_t2048_mha_causal_one_pass", 2, 2048, 2048, 8, 8, 128, causal=True,
         blocks=BlockSizes(mosaic_bwd=MosaicBwdBlocks(one_pass=True))),
    # Mosaic forward with intra-warpgroup overlap: causal with 3 slots, and ragged T != S at H=64.
    Case("gpu_t2048_mha_causal_overlap_slots3", 2, 2048, 2048, 8, 8, 128, causal=True,
         blocks=BlockSizes(mosaic=MosaicBlocks(block_kv=64, max_concurrent_steps=3, overlap=True))),
    Case("gpu_t1000_s1500_gqa2_full_overlap_d64", 2, 1000, 1500, 8, 2, 64,
         blocks=BlockSizes(mosaic=MosaicBlocks(overlap=True))),
)


def bench_cases(seq_lens=(1024, 4096, 16384), head_dims=(128,), tokens=16384, heads=16):
    """B * S = `tokens`, N = K = `heads`, full and causal (the GPU_FACTS.md table shape)."""
    return tuple(
        Case(f"s{s // 1024}k_d{h}_{'causal' if causal else 'full'}", tokens // s, s, s, heads,
              heads, h, causal=causal)
        for s in seq_lens for h in head_dims for causal in (False, True))


BENCH_CASES = bench_cases()
BENCH_CASES_FULL = bench_cases(seq_lens=(1024, 2048, 4096, 8192, 16384), head_dims=(64, 128))
SMOKE_CASES = (Case("smoke_t256_causal", 1, 256, 256, 2, 2, 64, causal=True),)
