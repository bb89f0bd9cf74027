"""Shared test helpers for kernel contract tests: random inputs, the tolerance table and error metric."""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Relative error ||out - ref|| / ||ref|| against the fp32 reference (DESIGN.md), forward and gradients.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 1e-2}
_POOL_SIZE = 1 << 18


def seed(name: str) -> int:
    """A seed derived from a name (a case id, plus what is drawn): the same every run."""
    return zlib.crc32(name.encode())


@jax.jit
def _normal_pool(key):
    """One fixed-shape draw, compiled once: CPU cases slice it instead of compiling a draw per shape."""
    return jax.random.normal(key, (_POOL_SIZE,), jnp.float32)


def normal(name, shape, scale=1.0, shift=0.0):
    """Fresh N(shift, scale^2) fp32 numpy draw of this shape, seeded from a name derived from the case id."""
    key = jax.random.key(seed(name))
    size = math.prod(shape)
    if size > _POOL_SIZE:  # GPU-sized cases: draw directly
        values = np.asarray(jax.random.normal(key, (size,), jnp.float32))
    else:
        values = np.asarray(_normal_pool(key))[:size]
    return shift + scale * values.reshape(shape)


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


def backend_dtype_params(backends, dtypes):
    """pytest params (backend fields..., dtype) of a contract test: every backend at every dtype
    but the reference backend at float32, where the API's reference path is the very function it
    would be compared with (the reference itself is checked against float64 numpy instead).
    `backends`: names, or tuples whose first field is the name."""
    params = []
    for backend in backends:
        fields = backend if isinstance(backend, tuple) else (backend,)
        for dtype in dtypes:
            if fields[0] == "reference" and jnp.dtype(dtype) == jnp.float32:
                continue
            params.append(pytest.param(*fields, dtype, id=f"{fields[0]}-{jnp.dtype(dtype).name}"))
    return params


def record_split_merges(monkeypatch) -> list[bool]:
    """Spies on the paged decode kernel: for each call, whether it merged its splits itself
    (it then returns two results, not the three partials)."""
    from pallas_kernels.decode_attention import triton_decode

    merged, partials = [], triton_decode.decode_partials

    def spy(*args, **kwargs):
        results = partials(*args, **kwargs)
        merged.append(len(results) == 2)
        return results

    monkeypatch.setattr(triton_decode, "decode_partials", spy)
    return merged
