"""Softmax benchmarks: ours (Triton kernels) vs XLA (jax.nn.softmax) in one run; rows, no files.

GB/s counts nominal bytes: fwd reads x and writes y; fwd_bwd adds reading y and dy and writing dx.
XLA's peer is jax.nn.softmax (the function a model would otherwise call), not our reference.
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _bench
from pallas_kernels.softmax import api, cases, config as softmax_config

CASES = tuple(cases.SoftmaxCase(f"{r}x{c}", (r, c)) for r, c in cases.BENCH_SHAPES)
IMPLS = ("triton", "xla")
MODES = ("fwd", "fwd_bwd")


def nominal_bytes(case, dtype, mode):
    tensor = math.prod(case.shape) * jnp.dtype(dtype).itemsize
    return 2 * tensor if mode == "fwd" else 5 * tensor


def _timed_fn(impl, mode, cfg):
    if impl == "xla":
        f = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
    else:
        f = lambda x: api.softmax(x, -1, backend="triton", config=cfg)  # noqa: E731
    if mode == "fwd":
        return jax.jit(lambda x, dy: f(x))

    def fwd_bwd(x, dy):
        y, vjp = jax.vjp(f, x)
        return y, vjp(dy)[0]
    return jax.jit(fwd_bwd)


def _arg_sets(case, dtype, n_sets):
    sets = []
    for i in range(n_sets):
        kx, kdy = jax.random.split(jax.random.key(i))
        sets.append((3 * jax.random.normal(kx, case.shape, jnp.float32).astype(dtype),
                     jax.random.normal(kdy, case.shape, jnp.float32).astype(dtype)))
    return sets


def _row(case, impl, mode, dtype, cfg, reps, label=None):
    row = dict(op="softmax", case=case.name, impl=label or impl, mode=mode, shape=list(case.shape),
               dtype=jnp.dtype(dtype).name, **_bench.environment())
    if impl == "triton":
        cfg = cfg or softmax_config.default_config(math.prod(case.shape[:-1]), case.shape[-1])
        row["config"] = str(cfg)
    return _bench.add_bandwidth_timing(row, lambda: _timed_fn(impl, mode, cfg),
                                       lambda n_sets: _arg_sets(case, dtype, n_sets), reps,
                                       nbytes=nominal_bytes(case, dtype, mode))


def rows(case_names=None, impls=IMPLS, modes=MODES, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl, mode): time_ms (median of reps runs), bytes, gbps, device, config."""
    return [_row(c, impl, mode, dtype, None, reps) for c in _bench.select(CASES, case_names)
            for impl in impls for mode in modes]


def sweep_rows(shape=(16384, 4096), dtype=jnp.bfloat16, reps=50):
    """Triton config sweep for one shape: rows labelled triton[block_rows,block_cols,warps]."""
    case = cases.SoftmaxCase(f"{shape[0]}x{shape[1]}", shape)
    width = min(pl.next_power_of_2(shape[1]), softmax_config.MAX_SINGLE_TILE_COLS)
    out = []
    for block_cols in sorted({width, min(width, softmax_config.ONLINE_BLOCK_COLS)}):
        for block_rows in (1, 2, 4, 8):
            for num_warps in (4, 8, 16):
                cfg = softmax_config.SoftmaxConfig(block_rows=block_rows, block_cols=block_cols,
                                                   num_warps=num_warps)
                label = f"triton[{block_rows},{block_cols},{num_warps}]"
                out += [_row(case, "triton", mode, dtype, cfg, reps, label) for mode in MODES]
    return out
