"""The jax_triton kernels vs the fp32 jnp reference; skipped, with the reason, without jax_triton or a GPU."""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _testing
from pallas_kernels import triton as triton_kernels
from pallas_kernels.norms import reference

REASON = triton_kernels.unavailable_reason()
needs_jax_triton = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.mark.gpu
@needs_jax_triton
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 768), (17, 1000), (2, 3, 4096), (4096, 5120)], ids=str)
def test_rms_norm_residual_matches_reference(shape, dtype):
    name = "x".join(map(str, shape))
    x = jnp.asarray(_testing.normal(f"{name}/x", shape, 2.0), dtype)
    residual = jnp.asarray(_testing.normal(f"{name}/residual", shape), dtype)
    weight = jnp.asarray(_testing.normal(f"{name}/weight", shape[-1:], 0.2, 1.0), dtype)
    normed, new_residual = jax.jit(triton_kernels.rms_norm_residual)(x, residual, weight)
    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    normed_ref, new_residual_ref = reference.rms_norm_residual(up(x), up(residual), up(weight))
    assert normed.dtype == dtype and new_residual.shape == shape
    _testing.assert_close(normed, normed_ref, dtype, "normed")
    _testing.assert_close(new_residual, new_residual_ref, dtype, "new_residual")


@pytest.mark.parametrize("args,match", [
    (dict(x=jnp.ones((2, 8), jnp.int32)), "dtype=int32"),
    (dict(residual=jnp.ones((2, 9))), r"residual shape=\(2, 9\)"),
    (dict(weight=jnp.ones((9,))), r"weight shape=\(9,\)"),
    (dict(x=jnp.ones((1, 16385)), residual=jnp.ones((1, 16385)), weight=jnp.ones((16385,))), "hidden=16385"),
    (dict(eps=0.0), "eps=0.0"),
])
def test_bad_input_raises(args, match):
    full = dict(x=jnp.ones((2, 8)), residual=jnp.ones((2, 8)), weight=jnp.ones((8,)), eps=1e-6)
    full.update(args)
    with pytest.raises(ValueError, match=match):
        triton_kernels.rms_norm_residual(full["x"], full["residual"], full["weight"], eps=full["eps"])


@pytest.mark.skipif(REASON is None, reason="jax_triton and a GPU are present")
def test_unavailable_raises_with_the_reason():
    with pytest.raises(RuntimeError, match="jax_triton|GPU"):
        triton_kernels.rms_norm_residual(jnp.ones((2, 8)), jnp.ones((2, 8)), jnp.ones((8,)))
