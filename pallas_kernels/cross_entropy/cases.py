"""Named shapes shared by the cross-entropy tests and benchmarks."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class CrossEntropyCase:
    """lead: leading shape of hidden/labels (tokens = its product); chunk_size None = the default."""
    name: str
    lead: tuple[int, ...]
    vocab: int
    d_model: int
    chunk_size: int | None = None
    reduction: str = "mean"
    z_loss: float = 0.0
    ignore_fraction: float = 0.0


CPU_CASES = (
    CrossEntropyCase("1tok", (1,), vocab=1000, d_model=64),
    CrossEntropyCase("17tok_chunk4_ignore", (17,), vocab=1000, d_model=96, chunk_size=4, ignore_fraction=0.3),
    CrossEntropyCase("2x3_sum_zloss", (2, 3), vocab=777, d_model=64, chunk_size=2, reduction="sum",
                     z_loss=1e-3),
    CrossEntropyCase("2x9_none", (2, 9), vocab=1000, d_model=64, chunk_size=5, reduction="none",
                     ignore_fraction=0.2),
    # A vocabulary over the kernel's one-tile width: the online pass over several column tiles, the last ragged.
    CrossEntropyCase("5tok_v20000_zloss", (5,), vocab=20000, d_model=16, chunk_size=2, z_loss=1e-3,
                     ignore_fraction=0.2),
)

GPU_CASES = (
    CrossEntropyCase("4096tok_gpt2", (4, 1024), vocab=50257, d_model=768, ignore_fraction=0.1),
    CrossEntropyCase("4096tok_gpt2_zloss_none", (4096,), vocab=50257, d_model=768, reduction="none",
                     z_loss=1e-4),
    CrossEntropyCase("2048tok_llama3", (2048,), vocab=128256, d_model=4096, chunk_size=512),
)

# Benchmarks (bf16), from the issue: 16k tokens, vocab 50257 and 128256, d_model 768 and 4096.
BENCH_CASES = tuple(
    CrossEntropyCase(f"16k_v{vocab}_d{d}", (16384,), vocab=vocab, d_model=d)
    for vocab in (50257, 128256) for d in (768, 4096)
)
