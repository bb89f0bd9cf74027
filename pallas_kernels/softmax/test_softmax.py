"""Contract test for softmax: every backend against the fp32 reference, forward and VJP, plus -inf rows."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.softmax import api as softmax_op
from pallas_kernels.softmax import cases, config as softmax_config, reference

ON_GPU = jax.default_backend() == "gpu"
BACKENDS = [("reference", False), ("triton", not ON_GPU)]
DTYPES = [jnp.float32, jnp.bfloat16]
GPU_DTYPES = DTYPES + [jnp.float16]  # float16 on the GPU only, to keep the CPU suite short


def _config(case):
    if case.block_cols is None:
        return None
    moved = case.shape[case.axis]
    rows = math.prod(case.shape) // moved
    return softmax_config.SoftmaxConfig(block_rows=min(4, rows), block_cols=case.block_cols, num_warps=4)


def _forward_and_vjp(f, x, dy):
    def run(x, dy):
        y, vjp = jax.vjp(f, x)
        return y, vjp(dy)[0]
    return jax.jit(run)(x, dy)


def _check(x, dy, case, dtype, backend, interpret):
    """Compare our softmax and its VJP with the fp32 reference on the same (rounded) values."""
    ours = lambda x: softmax_op.softmax(x, case.axis, backend=backend, interpret=interpret,  # noqa: E731
                                        config=_config(case))
    y, dx = _forward_and_vjp(ours, jnp.asarray(x, dtype), jnp.asarray(dy, dtype))
    x32, dy32 = (jnp.asarray(a, dtype).astype(jnp.float32) for a in (x, dy))
    y_ref, dx_ref = _forward_and_vjp(lambda x: reference.softmax(x, case.axis), x32, dy32)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    _testing.assert_close(y, y_ref, dtype, f"{case.name} softmax")
    _testing.assert_close(dx, dx_ref, dtype, f"{case.name} dx")
    return y, dx


@pytest.mark.parametrize("backend,interpret,dtype", _testing.backend_dtype_params(BACKENDS, DTYPES))
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype, backend, interpret):
    x = _testing.normal(f"{case.name}/x", case.shape, 3.0)
    dy = _testing.normal(f"{case.name}/dy", case.shape)
    _check(x, dy, case, dtype, backend, interpret)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_matches_reference_gpu(case, dtype):
    x = _testing.normal(f"{case.name}/x", case.shape, 3.0)
    dy = _testing.normal(f"{case.name}/dy", case.shape)
    _check(x, dy, case, dtype, "triton", False)


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("block_cols", [None, 256], ids=["one_tile", "online"])
def test_infinite_and_large_negative_rows(block_cols, backend, interpret):
    """Rows: all -inf (-> zeros, zero grad), all -1e30, -inf mixed with finite, -1e30 mixed with finite."""
    case = cases.SoftmaxCase(f"special_{block_cols}", (5, 1000), block_cols=block_cols)
    x = _testing.normal("special/x", case.shape, 3.0)
    x[0] = -np.inf
    x[1] = -1e30
    x[2, ::3] = -np.inf
    x[3, 1::2] = -1e30
    x[4, :-1] = -np.inf  # one finite entry, in the last (partly masked) chunk
    dy = _testing.normal("special/dy", case.shape)
    y, dx = _check(x, dy, case, jnp.float32, backend, interpret)
    assert np.all(np.asarray(y[0]) == 0) and np.all(np.asarray(dx[0]) == 0)
    np.testing.assert_allclose(np.asarray(y[1]), 1 / 1000, rtol=1e-6)
    assert np.all(np.asarray(y[2, ::3]) == 0) and np.all(np.asarray(y[3, 1::2]) == 0)
    assert float(y[4, -1]) == 1.0


def test_reference_is_the_float64_formula():
    """The reference against exp(x - max) / sum in float64 numpy, an all -inf row giving zeros."""
    x = _testing.normal("reference/x", (6, 129), 3.0)
    x[1] = -np.inf
    x[2, ::2] = -np.inf
    x64 = x.astype(np.float64)
    finite = np.isfinite(x64).any(axis=1)
    shift = np.where(finite[:, None], x64, 0).max(axis=1, keepdims=True)
    e = np.exp(x64 - shift)
    expected = np.where(finite[:, None], e / e.sum(axis=1, keepdims=True), 0.0)
    np.testing.assert_allclose(np.asarray(reference.softmax(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.ones((2, 8), jnp.int32)), "dtype=int32"),
    (dict(axis=2), "axis=2"),
    (dict(x=jnp.ones((2, 0))), r"shape=\(2, 0\)"),
    (dict(backend="xla"), "backend='xla'"),
])
def test_bad_input_raises(kwargs, match):
    x = kwargs.pop("x", jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=match):
        softmax_op.softmax(x, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="checks the error raised without a GPU")
def test_triton_without_gpu_raises():
    with pytest.raises(ValueError, match="backend='triton' needs a GPU"):
        softmax_op.softmax(jnp.ones((2, 8)), backend="triton")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="block_cols=100"):
        softmax_config.SoftmaxConfig(block_rows=1, block_cols=100, num_warps=4)
