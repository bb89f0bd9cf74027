"""Launch configuration of the paged decode kernel: a frozen dataclass and its heuristic."""
import dataclasses

from jax.experimental import pallas as pl

from pallas_kernels import _api

# Keys per inner step and programs to fill an H100 (132 SMs, a few programs each): the
# sequence is split into `num_splits` ranges of pages whose partial softmaxes are merged
# afterwards (flash-decoding, Dao et al. 2023), so batch 1 still spreads over the GPU.
_TARGET_KEYS_PER_STEP = 64
_TARGET_PROGRAMS = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBlocks:
    """pages_per_step: pages loaded per inner step; pages_per_split: pages one program covers
    (a multiple of pages_per_step); num_warps, num_stages: Triton launch options. Powers of 2."""
    pages_per_step: int
    pages_per_split: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("pages_per_step", "pages_per_split", "num_warps"),
                                 warps=("num_warps",))
        if self.pages_per_split % self.pages_per_step:
            raise ValueError(f"DecodeBlocks.pages_per_split={self.pages_per_split} must be a multiple "
                             f"of pages_per_step={self.pages_per_step}")


def default_blocks(batch: int, kv_heads: int, pages_per_seq: int, page_size: int) -> DecodeBlocks:
    """Heuristic: ~64 keys per step; enough splits for ~512 programs, never below one step."""
    table = pl.next_power_of_2(pages_per_seq)
    per_step = min(table, max(1, _TARGET_KEYS_PER_STEP // page_size))
    splits_wanted = max(1, _TARGET_PROGRAMS // (batch * kv_heads))
    per_split = max(per_step, pl.next_power_of_2(pl.cdiv(table, splits_wanted)))
    return DecodeBlocks(pages_per_step=per_step, pages_per_split=min(per_split, table))
