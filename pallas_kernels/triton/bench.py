"""Fused residual + RMSNorm forward: the Triton kernel (jax_triton) vs the Pallas one vs XLA; rows only.

GB/s uses the norms benchmark's nominal bytes (read x, residual, weight; write y, new residual).
"""
import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.norms import api, bench as norms_bench, cases, reference
from pallas_kernels.triton import add_rms_norm

CASES = tuple(cases.NormCase(f"rms_norm_residual_{r}x{h}", "rms_norm_residual", (r, h))
              for r, h in cases.BENCH_SHAPES)
IMPLS = {
    "jax_triton": add_rms_norm.rms_norm_residual,
    "triton": lambda x, r, w: api.rms_norm_residual(x, r, w, backend="triton"),  # Pallas-Triton
    "xla": reference.rms_norm_residual,
}


def rows(case_names=None, impls=tuple(IMPLS), dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl, "fwd"): time_ms (median of reps runs), bytes, gbps."""
    out = []
    for case in _bench.select(CASES, case_names):
        keys = jax.random.split(jax.random.key(0), 3)
        x, residual = (jax.random.normal(k, case.shape, jnp.float32).astype(dtype) for k in keys[:2])
        weight = (1 + 0.1 * jax.random.normal(keys[2], case.shape[-1:])).astype(dtype)
        nbytes = norms_bench.nominal_bytes(case, dtype, "fwd")
        for impl in impls:
            row = dict(op="rms_norm_residual_triton", case=case.name, impl=impl, mode="fwd",
                       shape=list(case.shape), dtype=jnp.dtype(dtype).name, **_bench.environment())
            # The same inputs every call, whatever their size (no rotation).
            out.append(_bench.add_bandwidth_timing(row, lambda: jax.jit(IMPLS[impl]),
                                                   lambda n_sets: [(x, residual, weight)], reps,
                                                   nbytes=nbytes))
    return out
