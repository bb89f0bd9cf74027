"""Launch configuration of the matvec kernel: a frozen dataclass and its heuristic."""
import dataclasses

from pallas_kernels import _api

MAX_BLOCK_K = 512  # [16, 512] bf16 weight tiles: 16 KB a pipeline stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatvecBlocks:
    """block_n: output columns (weight rows) a program computes, >= 16 (Triton dots);
    block_k: input columns per step of its loop over K; num_warps, num_stages: Triton launch
    options (num_stages: weight tiles in flight). Powers of 2."""
    block_n: int = 16
    block_k: int = MAX_BLOCK_K
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("block_n", "block_k", "num_warps"), warps=("num_warps",))
        if self.block_n < 16 or self.block_k < 16:
            raise ValueError(f"MatvecBlocks block_n={self.block_n}, block_k={self.block_k}: both must be "
                             ">= 16 (Triton dots)")
        if self.num_stages < 1:
            raise ValueError(f"MatvecBlocks.num_stages={self.num_stages} must be >= 1")


def largest_power_of_2_dividing(n: int, at_most: int) -> int:
    return min(n & -n, at_most)


def default_blocks(n: int, k: int) -> MatvecBlocks:
    """16 output columns a program (a [2048, 2048] weight: 128 programs of 64 KB) and the
    widest K step up to 512 that divides K."""
    return MatvecBlocks(block_n=16, block_k=largest_power_of_2_dividing(k, MAX_BLOCK_K))


def kernel_gap(n: int, k: int, blocks: MatvecBlocks) -> str | None:
    """Why the kernel cannot take an [N, K] weight with these blocks, or None if it can."""
    if n % blocks.block_n:
        return f"N={n} is not a multiple of block_n={blocks.block_n}"
    if k % blocks.block_k:
        return f"K={k} is not a multiple of block_k={blocks.block_k}"
    return None
