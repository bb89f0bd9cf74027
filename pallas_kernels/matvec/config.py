"""Launch configuration of the matvec kernel: a frozen dataclass and its heuristic."""
import dataclasses

from pallas_kernels import _api

MAX_BLOCK_K = 512  # tensor-core path: [16, 512] bf16 weight tiles, 16 KB a pipeline stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatvecBlocks:
    """block_n: output columns (weight rows) a program computes; block_k: input columns per
    step of its loop over K; dot: multiply on tensor cores (the rows repeated to 16; block_n and
    block_k >= 16), else in fp32 FMAs with a sum over each step; num_warps, num_stages: Triton
    launch options (num_stages: weight tiles in flight). Powers of 2, but num_stages."""
    block_n: int = 16
    block_k: int = MAX_BLOCK_K
    dot: bool = True
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("block_n", "block_k", "num_warps"), warps=("num_warps",))
        if self.dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"MatvecBlocks block_n={self.block_n}, block_k={self.block_k}: both must be "
                             ">= 16 with dot=True (Triton dots)")
        if self.num_stages < 1:
            raise ValueError(f"MatvecBlocks.num_stages={self.num_stages} must be >= 1")


def default_blocks(n: int, k: int, rows: int = 1) -> MatvecBlocks:
    """One row: fp32 FMAs, 4 output columns a program and up to 2048 of K a step (H200, Llama
    1.1B shapes: 2.4-3.5 TB/s where tensor-core tiles of 16 columns reached 1.3-2.7,
    benchmarks/NOTES.md). More rows: tensor cores, 16 columns, 512 of K, 4 stages."""
    if rows == 1:
        return MatvecBlocks(block_n=4, block_k=min(2048, 1 << (k - 1).bit_length()), dot=False,
                            num_stages=1)
    return MatvecBlocks(block_n=16, block_k=max(16, min(MAX_BLOCK_K, 1 << (k - 1).bit_length())), num_stages=4)


def kernel_gap(n: int, k: int, blocks: MatvecBlocks, head_dim: int | None = None) -> str | None:
    """Why the kernel cannot take an [N, K] weight with these blocks (and rotary heads of
    head_dim columns), or None if it can (a K that block_k does not divide is masked)."""
    if n % blocks.block_n:
        return f"N={n} is not a multiple of block_n={blocks.block_n}"
    if head_dim is not None and (blocks.block_n < 2 or (head_dim // 2) % (blocks.block_n // 2)):
        return (f"rotary heads of {head_dim} columns: a program takes block_n / 2 = {blocks.block_n // 2} "
                "columns of each half, which must divide head_dim / 2")
    return None
