"""Norm benchmarks: ours (Triton kernels) vs XLA (the jitted reference) in one run; rows, no files.

GB/s counts the bytes a fused implementation must move (nominal, the same for every impl):
  fwd:      read x (+ residual) + weight (+ bias), write y (+ new residual);
  fwd_bwd:  fwd + read the normalized input, dy (+ d new residual), write dx, dweight (+ dbias).
fwd_bwd times one program returning the outputs and all gradients (jax.vjp with a random cotangent).
"""
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
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
               shape=list(case.shape), dtype=jnp.dtype(dtype).name, **_bench.environment())
    rows, hidden = math.prod(case.shape[:-1]), case.shape[-1]
    if impl == "triton":
        cfg = cfg or norm_config.tuned_config(case.fn, rows, hidden, dtype, interpret=False)
        row["config"] = str(cfg)
    return _bench.add_bandwidth_timing(row, lambda: _timed_fn(case, impl, mode, cfg),
                                       lambda n_sets: _arg_sets(case, dtype, n_sets), reps,
                                       nbytes=nominal_bytes(case, dtype, mode))


def rows(case_names=None, impls=IMPLS, modes=MODES, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl, mode): time_ms (median of reps runs), bytes, gbps, device, config."""
    return [_row(c, impl, mode, dtype, None, reps) for c in _bench.select(CASES, case_names)
            for impl in impls for mode in modes]


def sweep_rows(fn="rms_norm", shape=(16384, 4096), dtype=jnp.bfloat16, reps=50):
    """Triton config sweep for one shape (for a tuning table).

    Rows are labelled triton[block_rows,num_warps,programs per SM].
    """
    case = cases.NormCase(f"{fn}_{'x'.join(map(str, shape))}", fn, shape)
    sm_count = norm_config.sm_count()
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

