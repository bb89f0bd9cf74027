"""Named grouped-matmul shapes shared by the tests and the benchmark: Y[m, N] = X[m, K] @ W[g][K, N]."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _testing
from pallas_kernels.matmul.config import TritonBlocks


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m: int
    k: int
    n: int
    group_sizes: tuple[int, ...]  # rows per group; sum may fall short of m (rows past it give 0)
    blocks: TritonBlocks | None = None  # None: heuristic

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    def inputs(self, dtype):
        """Random x [m, K], w [G, K, N] (N(0, 1) fp32 draws cast to dtype), group_sizes [G]."""
        x = _testing.normal(f"{self.name}/x", (self.m, self.k))
        w = _testing.normal(f"{self.name}/w", (self.n_groups, self.k, self.n))
        return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(self.group_sizes, jnp.int32)

    def cotangent(self, dtype):
        return jnp.asarray(_testing.normal(f"{self.name}/dy", (self.m, self.n)), dtype)

    def flops(self) -> float:
        """2·rows·K·N over the rows in a group: the routed work only."""
        return 2.0 * sum(self.group_sizes) * self.k * self.n


def balanced(m: int, n_groups: int) -> tuple[int, ...]:
    return tuple(np.diff(np.linspace(0, m, n_groups + 1).round().astype(int)).tolist())


def skewed(m: int, n_groups: int, seed: int = 0) -> tuple[int, ...]:
    """Group sizes drawn from a Dirichlet(1) split of m: some groups large, some near empty."""
    share = np.random.default_rng(seed).dirichlet(np.ones(n_groups))
    sizes = np.floor(share * m).astype(int)
    sizes[0] += m - sizes.sum()
    return tuple(sizes.tolist())


def gpu_device_inputs(case, dtype, n_sets):
    """`n_sets` argument tuples (x, w, group_sizes) drawn on the device (fast at large sizes)."""
    sets = []
    for i in range(n_sets):
        kx, kw = jax.random.split(jax.random.key(i))
        sets.append((jax.random.normal(kx, (case.m, case.k), jnp.float32).astype(dtype),
                     (jax.random.normal(kw, (case.n_groups, case.k, case.n), jnp.float32) * 0.02).astype(dtype),
                     jnp.asarray(case.group_sizes, jnp.int32)))
    return sets


# Interpret mode on CPU: tiny tiles so several row tiles, column tiles and K steps run.
_SMALL = TritonBlocks(block_m=16, block_n=16, block_k=16, group_m=2, num_warps=4, num_stages=2)
CPU_CASES = (
    # An empty group, groups not tile multiples, rows past the last group, K and N padded.
    Case("ragged_45x40x24_empty_group", 45, 40, 24, (10, 0, 30, 3), blocks=_SMALL),
    # One group holds every row; the others are empty.
    Case("one_group_33x32x32", 33, 32, 32, (0, 33, 0), blocks=_SMALL),
)
GPU_CASES = (
    Case("gpu_balanced_8192x1024x2048_e8", 8192, 1024, 2048, balanced(8192, 8)),
    Case("gpu_skewed_5000x768x1000_e16", 5000, 768, 1000, skewed(5000, 16)),
    Case("gpu_one_group_4096x512x512_e4", 4096, 512, 512, (0, 0, 4096, 0)),
)
# MoE expert MLPs of experiments/bench_moe.py (tokens*top_k rows) and a Mixtral-size one.
BENCH_CASES = (
    Case("d1024_f2048_e8_32k", 32768, 1024, 2048, balanced(32768, 8)),
    Case("d2048_f4096_e8_32k", 32768, 2048, 4096, balanced(32768, 8)),
    Case("d2048_f512_e64_128k", 131072, 2048, 512, balanced(131072, 64)),
    Case("d4096_f14336_e8_16k", 16384, 4096, 14336, balanced(16384, 8)),
    Case("d2048_f4096_e8_32k_skewed", 32768, 2048, 4096, skewed(32768, 8)),
)
SMOKE_CASES = (Case("smoke_64x64x64_e4", 64, 64, 64, (20, 0, 30, 14)),)
