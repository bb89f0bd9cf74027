"""Contract test for the norm functions: every backend against the fp32 reference, forward and VJP."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels import norms
from pallas_kernels.norms import cases, reference

ON_GPU = jax.default_backend() == "gpu"
# (backend, interpret): the reference everywhere; the Triton kernels natively on GPU, interpreted on CPU.
BACKENDS = [("reference", False), ("triton", not ON_GPU)]
DTYPES = [jnp.float32, jnp.bfloat16]
GPU_DTYPES = DTYPES + [jnp.float16]  # float16 on the GPU only, to keep the CPU suite short


def _inputs(case, dtype):
    """Random inputs by name (x, residual, weight, bias) and cotangents (dy, dsum) for a case."""
    hidden = case.shape[-1]

    def draw(what, shape, *scale_shift):
        return jnp.asarray(_testing.normal(f"{case.name}/{what}", shape, *scale_shift), dtype)

    return dict(
        x=draw("x", case.shape, 2.0, 0.5),  # non-zero mean, so LayerNorm's centering matters
        residual=draw("residual", case.shape),
        weight=draw("weight", (hidden,), 0.2, 1.0),
        bias=draw("bias", (hidden,), 0.5),
        dy=draw("dy", case.shape),
        dsum=draw("dsum", case.shape),
    )


# Positional inputs of each function, in order; the residual-fused ones return (normed, new_residual).
_ARGS = {"rms_norm": ("x", "weight"), "layer_norm": ("x", "weight", "bias"),
         "rms_norm_residual": ("x", "residual", "weight"),
         "layer_norm_residual": ("x", "residual", "weight", "bias")}


def _forward_and_vjp(fn, primals, cotangents, **kwargs):
    """(outputs as a tuple, VJP at cotangents), compiled as one program."""
    def run(primals, cotangents):
        out, vjp = jax.vjp(lambda *a: fn(*a, **kwargs), *primals)
        out, cotangents = (out, cotangents) if isinstance(out, tuple) else ((out,), cotangents[0])
        return out, vjp(cotangents)
    return jax.jit(run)(primals, cotangents)


@functools.cache
def _reference_result(case, dtype):
    """fp32 reference outputs and VJP on the case's (rounded) inputs; shared by the backends' tests."""
    inputs = {k: v.astype(jnp.float32) for k, v in _inputs(case, dtype).items()}
    primals = [inputs[name] for name in _ARGS[case.fn]]
    return _forward_and_vjp(getattr(reference, case.fn), primals, (inputs["dy"], inputs["dsum"]))


def _check_against_reference(case, dtype, backend, interpret):
    inputs = _inputs(case, dtype)
    primals = [inputs[name] for name in _ARGS[case.fn]]
    out, grads = _forward_and_vjp(getattr(norms, case.fn), primals, (inputs["dy"], inputs["dsum"]),
                                  backend=backend, interpret=interpret)
    out_ref, grads_ref = _reference_result(case, dtype)
    for i, (o, r) in enumerate(zip(out, out_ref, strict=True)):
        assert o.dtype == dtype and o.shape == case.shape
        _testing.assert_close(o, r, dtype, f"{case.name} output {i}")
    for name, g, r in zip(_ARGS[case.fn], grads, grads_ref, strict=True):
        assert g.shape == inputs[name].shape and g.dtype == dtype
        _testing.assert_close(g, r, dtype, f"{case.name} d{name}")


@pytest.mark.parametrize("backend,interpret,dtype", _testing.backend_dtype_params(BACKENDS, DTYPES))
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype, backend, interpret):
    _check_against_reference(case, dtype, backend, interpret)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_matches_reference_gpu(case, dtype):
    _check_against_reference(case, dtype, "triton", False)


def test_layer_norm_without_bias():
    case = cases.NormCase("layer_nobias_17x768", "layer_norm", (17, 768))
    x, weight, dy = (_inputs(case, jnp.float32)[k] for k in ("x", "weight", "dy"))
    f = jax.jit(lambda x, w: norms.layer_norm(x, w, None, interpret=not ON_GPU, backend="triton"))
    out, vjp = jax.vjp(f, x, weight)
    out_ref, vjp_ref = jax.vjp(lambda x, w: reference.layer_norm(x, w, None), x, weight)
    _testing.assert_close(out, out_ref, jnp.float32, "output")
    for g, r in zip(vjp(dy), vjp_ref(dy)):
        _testing.assert_close(g, r, jnp.float32, "gradient")


def test_auto_falls_back_to_reference_for_wide_rows(caplog):
    x = jax.random.normal(jax.random.key(1), (2, 16385))
    w = jnp.full((16385,), 1.5)
    with caplog.at_level("WARNING"):
        out = norms.rms_norm(x, w, interpret=True)
    _testing.assert_close(out, reference.rms_norm(x, w), jnp.float32)
    assert "hidden=16385" in caplog.text
    with pytest.raises(NotImplementedError, match="hidden=16385"):
        norms.rms_norm(x, w, backend="triton", interpret=True)


def _bad(**overrides):
    args = dict(x=jnp.ones((4, 8)), residual=jnp.ones((4, 8)), weight=jnp.ones((8,)), eps=1e-6,
                backend="auto")
    args.update(overrides)
    return lambda: norms.rms_norm_residual(args["x"], args["residual"], args["weight"], eps=args["eps"],
                                           backend=args["backend"], interpret=True)


def test_reference_is_the_float64_formula():
    """The references against RMSNorm (x / rms(x) * w) and LayerNorm ((x - mean) / std * w + b) in
    float64 numpy, and the residual-fused forms against the same of x + residual."""
    x, r = (_testing.normal(f"reference/{n}", (3, 5, 1000), 2.0, 0.5) for n in ("x", "r"))
    w, b = _testing.normal("reference/w", (1000,), 0.2, 1.0), _testing.normal("reference/b", (1000,), 0.5)

    def rms(s, eps=1e-6):
        return s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps) * w

    def layer(s, eps=1e-5):
        c = s - s.mean(axis=-1, keepdims=True)
        return c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + eps) * w + b

    x64, s64 = x.astype(np.float64), x.astype(np.float64) + r
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-5)
    close(np.asarray(reference.rms_norm(jnp.asarray(x), jnp.asarray(w))), rms(x64))
    close(np.asarray(reference.layer_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b))), layer(x64))
    y, total = reference.rms_norm_residual(jnp.asarray(x), jnp.asarray(r), jnp.asarray(w))
    close(np.asarray(y), rms(s64))
    close(np.asarray(total), s64)
    y, _ = reference.layer_norm_residual(jnp.asarray(x), jnp.asarray(r), jnp.asarray(w), jnp.asarray(b))
    close(np.asarray(y), layer(s64))


@pytest.mark.parametrize("overrides,match", [
    (dict(x=jnp.ones((4, 8), jnp.int32), residual=jnp.ones((4, 8), jnp.int32)), "dtype=int32"),
    (dict(weight=jnp.ones((5,))), r"weight shape=\(5,\)"),
    (dict(weight=jnp.ones((8,), jnp.int32)), "weight dtype=int32"),
    (dict(residual=jnp.ones((4, 7))), r"residual shape=\(4, 7\)"),
    (dict(residual=jnp.ones((4, 8), jnp.bfloat16)), "dtype=bfloat16"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(eps=-1e-5), "eps=-1e-05"),
    (dict(backend="cuda"), "backend='cuda'"),
])
def test_bad_input_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad(**overrides)()


def test_layer_norm_bad_bias_raises():
    with pytest.raises(ValueError, match=r"bias shape=\(3,\)"):
        norms.layer_norm(jnp.ones((2, 8)), jnp.ones((8,)), jnp.ones((3,)))


@pytest.mark.skipif(ON_GPU, reason="checks the error raised without a GPU")
def test_triton_without_gpu_raises():
    with pytest.raises(ValueError, match="backend='triton' needs a GPU"):
        norms.rms_norm(jnp.ones((2, 8)), jnp.ones((8,)), backend="triton")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="block_rows=3"):
        norms.NormConfig(block_rows=3, num_warps=4, bwd_num_warps=4, bwd_programs=1)
