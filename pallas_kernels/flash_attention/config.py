"""Tile sizes of the Pallas flash-attention kernels (Triton, Mosaic GPU) and the default heuristic.

T query length, S key length, H head dim. A block is a number of rows (query or key
positions) that one program holds at a time; Triton wants powers of two, and its
`dot` wants every dimension >= 16; Mosaic GPU tiles are wgmma sizes (multiples of 64).
"""
import dataclasses

import jax.numpy as jnp

from pallas_kernels.autotune import table as autotune_table

MIN_BLOCK = 16  # Triton dot: M, N, K >= 16.


def _check_mosaic_tiles(tiles, names):
    """Raise ValueError unless each named tile is a wgmma size and there are >= 2 slots."""
    for name in names:
        value = getattr(tiles, name)
        if not isinstance(value, int) or value % 64 or not 64 <= value <= 256:
            raise ValueError(f"{name}={value!r} must be 64, 128, 192 or 256 (wgmma tiles)")
    if not isinstance(tiles.max_concurrent_steps, int) or tiles.max_concurrent_steps < 2:
        raise ValueError(f"max_concurrent_steps={tiles.max_concurrent_steps!r} must be >= 2")


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Mosaic GPU forward: `block_q` rows per compute warpgroup (a CTA holds
    `compute_wgs` of them), `block_kv` keys per step, `max_concurrent_steps` K/V shared-memory
    slots in flight.
    `overlap`: FlashAttention-3 intra-warpgroup pipelining (a warpgroup issues the next step's
    Q K^T before its softmax of this step); it holds one more score tile in registers.
    `compute_wgs`: compute warpgroups per CTA, 2 or 3 (beside one TMA warpgroup). 3 is FA3's
    head_dim 64 shape (3 x 64 = 192 query rows a CTA share each K/V tile) and needs overlap=True:
    the ping-pong schedule without overlap alternates between exactly two warpgroups.
    `persistent`: one CTA per SM walks many tiles, loading the next tile's Q and K/V while it
    finishes the current one (FA3's persistent scheduler; twice the Q shared memory)."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    overlap: bool = False
    compute_wgs: int = 2
    persistent: bool = False

    def __post_init__(self):
        _check_mosaic_tiles(self, ("block_q", "block_kv"))
        for name in ("overlap", "persistent"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if not isinstance(self.compute_wgs, int) or self.compute_wgs not in (2, 3):
            raise ValueError(f"compute_wgs={self.compute_wgs!r} must be 2 or 3")
        if self.persistent and self.compute_wgs != 2:
            raise ValueError(f"persistent=True takes compute_wgs=2, got {self.compute_wgs} (three "
                             "warpgroups are not validated persistent yet)")
        if self.compute_wgs != 2 and not self.overlap:
            raise ValueError(f"compute_wgs={self.compute_wgs} needs overlap=True (the ping-pong "
                             "schedule of overlap=False takes turns between two warpgroups)")


@dataclasses.dataclass(frozen=True)
class MosaicBwdBlocks:
    """Tiles of the Mosaic GPU backward; a CTA runs two compute warpgroups.

    dQ kernel: `block_q_dq` query rows per compute warpgroup, `block_kv_dq` keys per step.
    dK/dV kernel: `block_kv_dkv` key rows per compute warpgroup, `block_q_dkv` query rows per
    step (of every query head in the GQA group). `max_concurrent_steps`: shared-memory slots of
    the streamed tiles in flight. The defaults are sized so a compute warpgroup's live fp32 tiles
    (two [64, 64] scores, dK and dV [64, H]: 192 registers a thread at H=128) fit its 232.
    `one_pass`: no dQ kernel; the dK/dV kernel also forms dQ = dS K for each query block and
    adds it into an fp32 buffer (FlashAttention-3: 5 matmuls a block pair instead of 7). Its
    warpgroups share each step's dS through shared memory and each adds half of dQ's columns
    (head_dim 128 only); the block_*_dq tiles are then unused.
    """

    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    max_concurrent_steps: int = 2
    one_pass: bool = False

    def __post_init__(self):
        _check_mosaic_tiles(self, ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"))
        if not isinstance(self.one_pass, bool):
            raise ValueError(f"one_pass={self.one_pass!r} must be a bool")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and launch options; frozen and hashable, so it can ride in a custom_vjp's static options.

    Forward: a program owns `block_q` query rows and loops over `block_kv` key rows.
    dQ kernel: `block_q_dq` query rows, looping over `block_kv_dq` key rows.
    dK/dV kernel: `block_kv_dkv` key rows, looping over `block_q_dkv` query rows of every
    query head in the GQA group.
    mosaic, mosaic_bwd: tiles of the Mosaic forward and backward (backend="mosaic").
    """

    block_q: int = 128
    block_kv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_warps_bwd: int = 4
    num_stages_bwd: int = 3
    mosaic: MosaicBlocks = MosaicBlocks()
    mosaic_bwd: MosaicBwdBlocks = MosaicBwdBlocks()

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("mosaic", "mosaic_bwd"):
                if not isinstance(value, field.type):
                    raise ValueError(f"{field.name}={value!r} must be a {field.type.__name__}")
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name}={value!r} must be a positive int")
            if field.name.startswith("block_") and (value < MIN_BLOCK or value & (value - 1)):
                raise ValueError(f"{field.name}={value} must be a power of two >= {MIN_BLOCK}")


def _fit(block: int, seq: int) -> int:
    """Shrink `block` to the smallest power of two covering `seq` (never below MIN_BLOCK)."""
    return max(MIN_BLOCK, min(block, 1 << max(seq - 1, 0).bit_length()))


def fit_to_shape(blocks: BlockSizes, seq_q: int, seq_kv: int) -> BlockSizes:
    """Clip every block to the sequence it tiles, so short sequences do not waste a big tile."""
    return dataclasses.replace(
        blocks,
        block_q=_fit(blocks.block_q, seq_q),
        block_kv=_fit(blocks.block_kv, seq_kv),
        block_q_dq=_fit(blocks.block_q_dq, seq_q),
        block_kv_dq=_fit(blocks.block_kv_dq, seq_kv),
        block_q_dkv=_fit(blocks.block_q_dkv, seq_q),
        block_kv_dkv=_fit(blocks.block_kv_dkv, seq_kv),
    )


def default_blocks(seq_q: int, seq_kv: int, head_dim: int, dtype, causal: bool) -> BlockSizes:
    """Default tiles. The 16-bit backward at H=128 is the best of `preset=tune_bwd` on our H100
    (2026-11-25, S=4k, CUPTI): dQ 128 x 64, dK/dV 64 x 128, 8 warps, 3 stages gave 413 TFLOP/s
    fwd+bwd full (0.69x cuDNN) and 321 causal (0.63x); the tutorial shape (32-row streams) gave
    369 / 269. The forward tiles are not tuned yet (`preset=tune`).

    16-bit inputs: forward 128 x 64 (8 warps at H=128); dQ holds 128 query rows and streams 64
    key rows, dK/dV holds 128 key rows and streams 64 query rows. At H=128 the backward takes 8 warps: the dK/dV program
    keeps two [128, 128] fp32 accumulators, 256 registers a thread with 4 warps (over the
    255-register cap: spills), 128 with 8. fp32 inputs take half the rows (twice the bytes).
    """
    if jnp.dtype(dtype) == jnp.float32:
        blocks = BlockSizes(block_q=64, block_kv=32, block_q_dq=64, block_kv_dq=32,
                            block_q_dkv=32, block_kv_dkv=64, num_warps=4, num_stages=2,
                            num_warps_bwd=4, num_stages_bwd=2)
    else:
        wide = head_dim > 64
        blocks = BlockSizes(block_q=128, block_kv=64, block_q_dq=128, block_kv_dq=64,
                            block_q_dkv=64, block_kv_dkv=128,
                            num_warps=8 if wide else 4, num_stages=3,
                            num_warps_bwd=8 if wide else 4, num_stages_bwd=3 if wide else 5)
    # Mosaic forward: intra-warpgroup overlap unless causal. On our H100 (preset=tune_mosaic,
    # 2026-11-25) it took full attention from 640 to 664 TFLOP/s at 4k and 674 to 698 at 16k,
    # and causal from 603 down to 376 (4k).
    blocks = dataclasses.replace(blocks, mosaic=dataclasses.replace(blocks.mosaic, overlap=not causal))
    return fit_to_shape(blocks, seq_q, seq_kv)


def tuned_blocks(seq_q: int, seq_kv: int, head_dim: int, causal: bool, dtype) -> BlockSizes:
    """default_blocks with the autotune table's entries for this GPU and shape applied: Triton
    tiles ("flash_attention"), Mosaic forward tiles ("flash_attention_mosaic") and Mosaic
    backward tiles ("flash_attention_mosaic_bwd")."""
    key = autotune_table.flash_attention_key(seq_q, seq_kv, head_dim, causal, dtype)
    blocks = autotune_table.best_config("flash_attention", key,
                                        default_blocks(seq_q, seq_kv, head_dim, dtype, causal))
    return dataclasses.replace(
        blocks, mosaic=autotune_table.best_config("flash_attention_mosaic", key, blocks.mosaic),
        mosaic_bwd=autotune_table.best_config("flash_attention_mosaic_bwd", key,
                                              blocks.mosaic_bwd))


def cudnn_flash_head_dim_ok(head_dim: int, hopper: bool = True) -> bool:
    """Whether cuDNN's flash attention (jax.nn.dot_product_attention) takes this head dim: a
    multiple of 8, at most 256 on Hopper (compute capability 9.0+) and 128 before it."""
    return head_dim % 8 == 0 and head_dim <= (256 if hopper else 128)
