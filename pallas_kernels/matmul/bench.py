"""Matmul benchmark: CASES x IMPLS x {bf16, fp8} -> rows. No argparse, no files.

`python -m experiments.bench_kernels matmul` calls `rows()` and writes the results; the
roofline (roofline.py) is drawn from the same rows. Peers: "xla" (XLA's dot: cuBLAS / cuBLASLt),
in the same run. Rows carry flops, bytes and intensity (FLOPs per byte an ideal kernel moves).
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.matmul import api, cases, roofline

FP8 = jnp.float8_e4m3fn
# Per-tensor scales of the fp8 rows (any value: a single multiply of the accumulator).
_A_SCALE, _B_SCALE = 0.5, 0.25


def _xla(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _xla_fp8(a, b):
    c = jnp.matmul(a, b, preferred_element_type=jnp.float32) * (_A_SCALE * _B_SCALE)
    return c.astype(jnp.bfloat16)


def _ours(backend, a, b):
    interpret = jax.default_backend() != "gpu"  # smoke runs on CPU
    return api.matmul(a, b, backend=backend, interpret=interpret)


def _ours_fp8(backend, a, b):
    interpret = jax.default_backend() != "gpu"
    return api.scaled_matmul(a, b, _A_SCALE, _B_SCALE, backend=backend, interpret=interpret)


# mode -> impl -> (function of (a, b), peer); bf16 in and out, fp32 accumulation everywhere.
IMPLS = {
    "bf16": {"xla": (_xla, True), "triton": (functools.partial(_ours, "triton"), False),
             "mosaic": (functools.partial(_ours, "mosaic"), False),
             "jax_triton": (functools.partial(_ours, "jax_triton"), False)},
    "fp8": {"xla": (_xla_fp8, True), "triton": (functools.partial(_ours_fp8, "triton"), False),
            "jax_triton": (functools.partial(_ours_fp8, "jax_triton"), False)},
}
_INPUT_DTYPES = {"bf16": jnp.bfloat16, "fp8": FP8}
# Extra figures of these rows, name -> draw(rows, path, title): bench_kernels may write each
# beside its JSON as <stem>-<name>.png (until it does: python -m pallas_kernels.matmul.roofline).
PLOTS = {"roofline": roofline.plot_roofline}
PRESETS = {
    "default": (cases.BENCH_CASES, ("bf16", "fp8")),
    "bf16": (cases.BENCH_CASES, ("bf16",)),
    "smoke": (cases.SMOKE_CASES, ("bf16",)),  # CPU
}


def measure(case, impl, mode, fn, peer, reps):
    """One row: time (median of reps CUPTI samples on GPU), tflops, intensity; or error."""
    in_dtype = _INPUT_DTYPES[mode]
    nbytes = case.nbytes(in_dtype, jnp.bfloat16)
    row = dict(op="matmul", case=case.name, impl=impl, mode=mode, peer=peer, m=case.m, n=case.n,
               k=case.k, dtype=jnp.dtype(in_dtype).name, flops=case.flops(), bytes=nbytes,
               intensity=case.flops() / nbytes, **_bench.environment())
    try:
        n_sets = 1 if 2 * nbytes > 256 << 20 else 4  # small inputs rotate so L2 does not hold them
        arg_sets = cases.gpu_device_inputs(case, in_dtype, n_sets)
        compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
        seconds = _bench.median_seconds(compiled, arg_sets, reps, min_sample_seconds=2e-3)
        row.update(_bench.throughput(seconds, flops=case.flops()))
    except Exception as e:  # an impl that cannot run here is a row, not a crash
        row["error"] = _bench.error_text(e, limit=200, first_line=True)
    return row


def rows(preset="default", case_names=None, impls=None, reps=20, log=print):
    """One row per (case, impl, mode) with time_ms, tflops, flops, bytes, intensity, peer (xla),
    or error. impls: names to keep (default all)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} unknown; use one of {tuple(PRESETS)}")
    bench_cases, modes = PRESETS[preset]
    out = []
    for case in _bench.select(bench_cases, case_names):
        for mode in modes:
            for impl, (fn, peer) in IMPLS[mode].items():
                if impls is not None and impl not in impls:
                    continue
                row = measure(case, impl, mode, fn, peer, reps)
                out.append(row)
                if log:
                    shown = row.get("error") or f"{row['tflops']:.4g} TFLOP/s ({row['time_ms']:.3f} ms)"
                    log(f"{case.name:>22} {mode:>5} {impl:>11}: {shown}")
    return out
