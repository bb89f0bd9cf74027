"""Named shapes shared by the paged decode-attention tests and benchmarks."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """batch sequences with `lengths` keys each (None: random in [1, max]), heads/kv_heads query
    and kv heads of head_dim, pages of page_size, table width pages_per_seq, pool of pool pages."""
    name: str
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    pages_per_seq: int
    lengths: tuple[int, ...] | None = None

    @property
    def pool(self) -> int:
        return self.batch * self.pages_per_seq + 3  # a few spare pages: tables are a permutation


# CPU interpret mode: GQA 4/2 with an idle slot (length 0), a one-key and a ragged length;
# multi-query attention (one kv head) with a full table; MHA; three heads a kv head (not a power
# of 2: padded to 16 rows, where the others are repeated in the kernel).
CPU_CASES = (
    DecodeCase("gqa4_2_ragged", 3, 4, 2, 16, 8, 6, lengths=(1, 45, 0)),
    DecodeCase("mqa8_1_full", 2, 8, 1, 32, 16, 4, lengths=(64, 17)),
    DecodeCase("mha4_4", 2, 4, 4, 16, 16, 3, lengths=(33, 48)),
    DecodeCase("gqa6_2_padded", 2, 6, 2, 16, 8, 4, lengths=(30, 5)),
)

# GPU: Llama-1B-like heads (32/4, 64) and GPT-2 (12/12, 64), long and short contexts.
GPU_CASES = (
    DecodeCase("llama1b_b1_2k", 1, 32, 4, 64, 16, 128, lengths=(2000,)),
    DecodeCase("llama1b_b32_ragged", 32, 32, 4, 64, 16, 64),
    DecodeCase("gpt2_b8_1k", 8, 12, 12, 64, 16, 64),
    DecodeCase("h128_b4_page32", 4, 16, 8, 128, 32, 32, lengths=(1, 1024, 500, 77)),
)

# Benchmark shapes: batch x context (bf16, 32 query / 8 kv heads of 128, pages of 16).
BENCH_SHAPES = ((1, 4096), (8, 2048), (32, 1024), (64, 4096))
