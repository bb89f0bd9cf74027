"""Named shapes shared by the softmax tests and benchmarks."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class SoftmaxCase:
    """shape: input shape; softmax over `axis`; block_cols forces the online (chunked) kernel when set."""
    name: str
    shape: tuple[int, ...]
    axis: int = -1
    block_cols: int | None = None


# CPU interpret mode: 1 and 17 rows, 768 and 1000 columns, a 3-D input, a non-last axis, the online path.
CPU_CASES = (
    SoftmaxCase("1x768", (1, 768)),
    SoftmaxCase("17x1000", (17, 1000)),
    SoftmaxCase("2x3x768_axis0", (2, 3, 768), axis=0),
    SoftmaxCase("17x1000_online", (17, 1000), block_cols=256),
)

# GPU: attention-score widths and vocabulary widths (online path above 16384 columns).
GPU_CASES = (
    SoftmaxCase("17x1000", (17, 1000)),
    SoftmaxCase("4x16x1024x1024", (4, 16, 1024, 1024)),
    SoftmaxCase("4096x4096", (4096, 4096)),
    SoftmaxCase("1024x16384", (1024, 16384)),
    SoftmaxCase("256x50257", (256, 50257)),
    SoftmaxCase("128x128256", (128, 128256)),
    SoftmaxCase("64x8192_axis0", (64, 8192), axis=0),
)

# Benchmark shapes (bf16): attention scores [B*N*T, S] and vocab-sized rows.
BENCH_SHAPES = ((65536, 1024), (16384, 4096), (4096, 16384), (2048, 50257), (1024, 128256))
