"""Named matmul shapes shared by the tests, the benchmark and the autotuner: C[M, N] = A[M, K] B[K, N]."""
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _testing
from pallas_kernels.matmul.config import MosaicTiles, TritonBlocks


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m: int
    n: int
    k: int
    blocks: TritonBlocks | MosaicTiles | None = None  # None: table / heuristic

    def inputs(self, dtype, seed_suffix=""):
        """Random a [M, K], b [K, N] (fp32 draws cast to dtype; N(0, 1)), seeded by the name."""
        a = _testing.normal(f"{self.name}/a{seed_suffix}", (self.m, self.k))
        b = _testing.normal(f"{self.name}/b{seed_suffix}", (self.k, self.n))
        return jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def flops(self) -> float:
        """2·M·N·K: one multiply and one add per term."""
        return 2.0 * self.m * self.n * self.k

    def nbytes(self, in_dtype, out_dtype) -> int:
        """Bytes an ideal kernel moves: read A and B once, write C once."""
        return ((self.m * self.k + self.k * self.n) * jnp.dtype(in_dtype).itemsize
                + self.m * self.n * jnp.dtype(out_dtype).itemsize)


def gpu_device_inputs(case, dtype, n_sets):
    """`n_sets` argument tuples drawn on the device (fast for large shapes)."""
    sets = []
    for i in range(n_sets):
        ka, kb = jax.random.split(jax.random.key(i), 2)
        sets.append((jax.random.normal(ka, (case.m, case.k), jnp.float32).astype(dtype),
                     jax.random.normal(kb, (case.k, case.n), jnp.float32).astype(dtype)))
    return sets


# Interpret mode on CPU: odd sizes (padding), several K steps, tiny tiles so several programs run.
_SMALL = TritonBlocks(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2)
CPU_CASES = (
    Case("1x8x16", 1, 8, 16),
    Case("37x70x50_small_tiles", 37, 70, 50, blocks=_SMALL),
    Case("64x48x96_small_tiles", 64, 48, 96, blocks=_SMALL),
    Case("100x130x70", 100, 130, 70),
)
# The Mosaic kernel in the GPU interpreter (slow: seconds per call).
MOSAIC_CPU_CASES = (
    Case("mosaic_128x256x128", 128, 256, 128,
         blocks=MosaicTiles(tile_m=64, tile_n=64, max_concurrent_steps=2, grid_tile_width=2)),
    Case("mosaic_100x200x70_wg_m", 100, 200, 70,
         blocks=MosaicTiles(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=3,
                            wg_dimension="m", grid_minor="m")),
)
GPU_CASES = (
    Case("gpu_1x4096x4096", 1, 4096, 4096),
    Case("gpu_1000x3000x500", 1000, 3000, 500),
    Case("gpu_128x128x128", 128, 128, 128),
    Case("gpu_2048x2048x4096", 2048, 2048, 4096),
)
# Arithmetic intensity (FLOPs per byte, bf16) from ~16 (skinny, memory-bound) to ~2700 (8192^3).
BENCH_CASES = (
    Case("m16_n8192_k8192", 16, 8192, 8192),
    Case("m128_n8192_k8192", 128, 8192, 8192),
    Case("m1024_n1024_k1024", 1024, 1024, 1024),
    Case("m2048_n2048_k2048", 2048, 2048, 2048),
    Case("m4096_n4096_k4096", 4096, 4096, 4096),
    Case("m16384_n4096_k14336", 16384, 4096, 14336),  # Llama-3 8B MLP down-projection, 16k tokens
    Case("m8192_n8192_k8192", 8192, 8192, 8192),
)
SMOKE_CASES = (Case("smoke_64x64x64", 64, 64, 64),)
