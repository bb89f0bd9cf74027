"""Softmax benchmarks: ours (Triton kernels) vs XLA (jax.nn.softmax) in one run; rows, no files.

GB/s counts nominal bytes: fwd reads x and writes y; fwd_bwd adds reading y and dy and writing dx.
XLA's peer is jax.nn.softmax (the function a model would otherwise call), not our reference.
"""
import datetime
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.softmax import api, cases, config as softmax_config

CASES = tuple(cases.SoftmaxCase(f"{r}x{c}", (r, c)) for r, c in cases.BENCH_SHAPES)
IMPLS = ("triton", "xla")
MODES = ("fwd", "fwd_bwd")


def _median_seconds(fn, arg_sets, reps):
    """Median wall time of fn(*args) over reps calls after warm-up, cycling through arg_sets."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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


def _row(case, impl, mode, dtype, cfg, reps, label=None):
    row = dict(op="softmax", case=case.name, impl=label or impl, mode=mode, shape=list(case.shape),
               dtype=jnp.dtype(dtype).name, device=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.date.today().isoformat())
    if impl == "triton":
        cfg = cfg or softmax_config.default_config(math.prod(case.shape[:-1]), case.shape[-1])
        row["config"] = str(cfg)
    nbytes = nominal_bytes(case, dtype, mode)
    try:
        n_sets = 1 if nbytes > (256 << 20) else 4  # rotate inputs that would stay in the 50 MB L2
        arg_sets = []
        for i in range(n_sets):
            kx, kdy = jax.random.split(jax.random.key(i))
            arg_sets.append((3 * jax.random.normal(kx, case.shape, jnp.float32).astype(dtype),
                             jax.random.normal(kdy, case.shape, jnp.float32).astype(dtype)))
        seconds = _median_seconds(_timed_fn(impl, mode, cfg), arg_sets, reps)
    except Exception as e:  # keep the other rows; the error is reported in this one
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row.update(time_ms=seconds * 1e3, bytes=nbytes, gbps=nbytes / seconds / 1e9)
    return row


def rows(case_names=None, impls=IMPLS, modes=MODES, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl, mode): time_ms (median of reps runs), bytes, gbps, device, config."""
    chosen = [c for c in CASES if case_names is None or c.name in case_names]
    return [_row(c, impl, mode, dtype, None, reps) for c in chosen for impl in impls for mode in modes]


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
