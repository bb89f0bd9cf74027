"""Norm benchmarks: ours (Triton kernels) vs XLA (the jitted reference) in one run; rows, no files.

GB/s counts the bytes a fused implementation must move (nominal, the same for every impl):
  fwd:      read x (+ residual) + weight (+ bias), write y (+ new residual);
  fwd_bwd:  fwd + read the normalized input, dy (+ d new residual), write dx, dweight (+ dbias).
fwd_bwd times one program returning the outputs and all gradients (jax.vjp with a random cotangent).
"""
import datetime
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.norms import api, cases, config as norm_config, reference

CASES = tuple(
    cases.NormCase(f"{fn}_{r}x{h}", fn, (r, h))
    for fn in ("rms_norm", "rms_norm_residual", "layer_norm", "layer_norm_residual")
    for r, h in cases.BENCH_SHAPES
)
IMPLS = ("triton", "xla")
MODES = ("fwd", "fwd_bwd")
_HAS_RESIDUAL = {"rms_norm": False, "layer_norm": False, "rms_norm_residual": True,
                 "layer_norm_residual": True}
_HAS_BIAS = {"rms_norm": False, "layer_norm": True, "rms_norm_residual": False,
             "layer_norm_residual": True}


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
    """Bytes a fused implementation must move for this case and mode (see module docstring)."""
    rows, hidden = math.prod(case.shape[:-1]), case.shape[-1]
    size = jnp.dtype(dtype).itemsize
    tensor, vector = rows * hidden * size, hidden * size
    vectors = 2 if _HAS_BIAS[case.fn] else 1
    tensors_in = 2 if _HAS_RESIDUAL[case.fn] else 1
    fwd = tensors_in * tensor + vectors * vector + tensors_in * tensor  # y (+ new residual) out
    if mode == "fwd":
        return fwd
    bwd = (1 + tensors_in) * tensor + vector + tensor + vectors * vector
    return fwd + bwd


def _function(case, impl, cfg):
    """f(x, residual, weight, bias) -> tuple of outputs, for one impl."""
    if impl == "xla":
        fn, kwargs = getattr(reference, case.fn), {}
    else:
        fn, kwargs = getattr(api, case.fn), dict(backend="triton", config=cfg)
    if case.fn == "rms_norm":
        return lambda x, r, w, b: (fn(x, w, **kwargs),)
    if case.fn == "layer_norm":
        return lambda x, r, w, b: (fn(x, w, b, **kwargs),)
    if case.fn == "rms_norm_residual":
        return lambda x, r, w, b: fn(x, r, w, **kwargs)
    return lambda x, r, w, b: fn(x, r, w, b, **kwargs)


def _arg_sets(case, dtype, n_sets):
    hidden = case.shape[-1]
    sets = []
    for i in range(n_sets):
        k = jax.random.split(jax.random.key(i), 6)
        normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)  # noqa: E731
        sets.append((normal(k[0], case.shape), normal(k[1], case.shape),
                     1 + 0.1 * normal(k[2], (hidden,)), normal(k[3], (hidden,)),
                     normal(k[4], case.shape), normal(k[5], case.shape)))
    return sets


def _timed_fn(case, impl, mode, cfg):
    f = _function(case, impl, cfg)
    if mode == "fwd":
        return jax.jit(lambda x, r, w, b, dy, ds: f(x, r, w, b))
    n_outputs = 2 if _HAS_RESIDUAL[case.fn] else 1

    def fwd_bwd(x, r, w, b, dy, ds):
        out, vjp = jax.vjp(f, x, r, w, b)
        return out, vjp((dy, ds)[:n_outputs])
    return jax.jit(fwd_bwd)


def _row(case, impl, mode, dtype, cfg, reps, label=None):
    row = dict(op="norms", case=case.name, fn=case.fn, impl=label or impl, mode=mode,
               shape=list(case.shape), dtype=jnp.dtype(dtype).name, device=jax.devices()[0].device_kind,
               jax=jax.__version__, date=datetime.date.today().isoformat())
    rows, hidden = math.prod(case.shape[:-1]), case.shape[-1]
    if impl == "triton":
        cfg = cfg or norm_config.default_config(rows, hidden, interpret=False)
        row["config"] = str(cfg)
    nbytes = nominal_bytes(case, dtype, mode)
    try:
        n_sets = 1 if nbytes > (256 << 20) else 4  # rotate inputs that would stay in the 50 MB L2
        seconds = _median_seconds(_timed_fn(case, impl, mode, cfg), _arg_sets(case, dtype, n_sets), reps)
    except Exception as e:  # keep the other rows; the error is reported in this one
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row.update(time_ms=seconds * 1e3, bytes=nbytes, gbps=nbytes / seconds / 1e9)
    return row


def rows(case_names=None, impls=IMPLS, modes=MODES, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl, mode): time_ms (median of reps runs), bytes, gbps, device, config."""
    chosen = [c for c in CASES if case_names is None or c.name in case_names]
    return [_row(c, impl, mode, dtype, None, reps) for c in chosen for impl in impls for mode in modes]


def sweep_rows(fn="rms_norm", shape=(16384, 4096), dtype=jnp.bfloat16, reps=50):
    """Triton config sweep for one shape (for a tuning table).

    Rows are labelled triton[block_rows,num_warps,programs per SM].
    """
    case = cases.NormCase(f"{fn}_{'x'.join(map(str, shape))}", fn, shape)
    sm_count = getattr(jax.devices()[0], "core_count", None) or 132
    out = []
    for block_rows in (1, 2, 4, 8):
        for num_warps in (4, 8, 16):
            for programs_per_sm in (1, 2, 4, 8):
                cfg = norm_config.NormConfig(block_rows=block_rows, num_warps=num_warps,
                                             bwd_num_warps=num_warps, bwd_programs=programs_per_sm * sm_count)
                label = f"triton[{block_rows},{num_warps},{programs_per_sm}x]"
                modes = MODES if programs_per_sm == 1 else ("fwd_bwd",)  # the forward ignores programs
                out += [_row(case, "triton", mode, dtype, cfg, reps, label) for mode in modes]
    return out

