"""Shared test helpers for kernel contract tests: the tolerance table and error metric."""
import jax.numpy as jnp
import numpy as np

# Relative error ||out - ref|| / ||ref|| against the fp32 reference (DESIGN.md), forward and gradients.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 1e-2}


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf so it never passes."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(ref))):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_close(out, ref, dtype, what="output"):
    """Assert relative error under TOLERANCE[dtype], naming what was compared."""
    err = relative_error(out, ref)
    tol = TOLERANCE[jnp.dtype(dtype)]
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g} ({jnp.dtype(dtype).name})"
