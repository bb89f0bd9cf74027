"""Named shapes shared by the norm tests and benchmarks."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class NormCase:
    """fn: one of rms_norm, layer_norm, rms_norm_residual, layer_norm_residual; shape: [..., hidden]."""
    name: str
    fn: str
    shape: tuple[int, ...]


# Small, odd shapes for CPU interpret mode: 1 and 17 rows, hidden 768 and 1000, a 3-D leading shape.
CPU_CASES = (
    NormCase("rms_1x768", "rms_norm", (1, 768)),
    NormCase("rms_residual_17x1000", "rms_norm_residual", (17, 1000)),
    NormCase("layer_17x1000", "layer_norm", (17, 1000)),
    NormCase("layer_residual_2x3x768", "layer_norm_residual", (2, 3, 768)),
)

# Real sizes, GPU only: hidden 768 (GPT-2), 1000 (odd), 4096 (Llama 7B), 5120 (Llama 13B), 8192.
GPU_CASES = tuple(
    NormCase(f"{fn}_{'x'.join(map(str, shape))}", fn, shape)
    for fn in ("rms_norm", "layer_norm", "rms_norm_residual", "layer_norm_residual")
    for shape in ((1, 4096), (17, 1000), (4, 1024, 768), (4096, 4096), (2048, 5120), (1024, 8192))
)

# Benchmark shapes (bf16): 16k rows as in the acceptance (16384 x 4096), plus GPT-2 width.
BENCH_SHAPES = ((16384, 4096), (16384, 768), (16384, 5120), (65536, 1024))
