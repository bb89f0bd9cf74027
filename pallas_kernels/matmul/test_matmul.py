"""Matmul kernels vs the fp32 reference: Pallas Triton in interpret mode and Mosaic GPU in the
GPU interpreter on CPU, lowering to Triton IR / a Mosaic GPU module for an abstract H100, input
checks, and gpu-marked tests of every backend."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.matmul import (api, bench, cases, mosaic_matmul, reference, roofline,
                                   triton_matmul)
from pallas_kernels.matmul.config import MosaicTiles, TritonBlocks
from pallas_kernels.triton import unavailable_reason

JAX_TRITON_REASON = unavailable_reason()
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=3)


def abstract_h100():
    """An abstract H100 mesh: Mosaic interpret mode and cross-lowering read the GPU from it."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_triton_interpret_matches_reference(case, dtype):
    a, b = case.inputs(dtype)
    out = api.matmul(a, b, backend="triton", interpret=True, blocks=case.blocks)
    assert out.shape == (case.m, case.n) and out.dtype == dtype
    _testing.assert_close(out, reference.matmul_reference(a, b), dtype)


def test_triton_interpret_gradients():
    case = cases.CPU_CASES[1]
    a, b = case.inputs(jnp.float32)
    dc = jnp.asarray(_testing.normal("matmul/dc", (case.m, case.n)))
    kernel = lambda a, b: api.matmul(a, b, backend="triton", interpret=True, blocks=case.blocks)  # noqa: E731
    _, vjp = jax.vjp(kernel, a, b)
    _, vjp_ref = jax.vjp(reference.matmul_reference, a, b)
    for got, want, name in zip(vjp(dc), vjp_ref(dc), ("da", "db")):
        _testing.assert_close(got, want, jnp.float32, name)


@pytest.mark.parametrize("case", cases.CPU_CASES[1:3], ids=lambda c: c.name)
def test_scaled_fp8_triton_interpret_matches_reference(case):
    a, b = case.inputs(api.FP8)
    out = api.scaled_matmul(a, b, 0.5, jnp.float32(3.0), backend="triton", interpret=True,
                            blocks=case.blocks)
    assert out.dtype == jnp.bfloat16
    _testing.assert_close(out, reference.scaled_matmul_reference(a, b, 0.5, 3.0), jnp.bfloat16)


@pytest.mark.parametrize("case", cases.MOSAIC_CPU_CASES, ids=lambda c: c.name)
def test_mosaic_gpu_interpret_matches_reference(case):
    a, b = case.inputs(jnp.bfloat16)
    with abstract_h100():
        out = api.matmul(a, b, backend="mosaic", interpret=True, blocks=case.blocks)
    _testing.assert_close(out, reference.matmul_reference(a, b), jnp.bfloat16)


def _lower_for_gpu(fn, *args):
    with abstract_h100():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, api.FP8], ids=lambda d: jnp.dtype(d).name)
def test_triton_kernel_lowers_for_gpu(dtype):
    """The Pallas kernel becomes Triton IR (a triton custom call) without a GPU present."""
    a, b = cases.Case("lower", 256, 256, 256).inputs(dtype)
    scale = jnp.ones((1,), jnp.float32) if dtype == api.FP8 else None
    text = _lower_for_gpu(lambda a, b: triton_matmul.matmul(a, b, scale, out_dtype=jnp.bfloat16,
                                                             blocks=TritonBlocks(), interpret=False),
                          a, b)
    assert "xla.gpu.triton" in text


def test_mosaic_kernel_lowers_for_gpu():
    """The default tiles at 1024^3 lower to a Mosaic GPU module (layouts, SMEM and barriers fit)."""
    a, b = cases.Case("lower", 1024, 1024, 1024).inputs(jnp.bfloat16)
    tiles = MosaicTiles()
    text = _lower_for_gpu(lambda a, b: mosaic_matmul.matmul(a, b, out_dtype=jnp.bfloat16,
                                                             tiles=tiles, interpret=False), a, b)
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(a=jnp.ones((2, 3, 4))), r"a must be rank 2"),
    (dict(b=jnp.ones((5, 4))), r"a's columns must equal b's rows"),
    (dict(a=jnp.ones((2, 3), jnp.int32), b=jnp.ones((3, 4), jnp.int32)), "dtype"),
    (dict(b=jnp.ones((3, 4), jnp.bfloat16)), "b.dtype=bfloat16"),
    (dict(backend="cuda"), "backend='cuda' unknown"),
    (dict(backend="triton"), "needs a GPU"),
    (dict(backend="mosaic", interpret=True, a=jnp.ones((2, 3)), b=jnp.ones((3, 4))),
     "dtype=float32 unsupported by backend='mosaic'"),
    (dict(backend="triton", interpret=True, blocks=MosaicTiles()), "TritonBlocks"),
    (dict(out_dtype=jnp.int8), "out_dtype=int8"),
])
def test_bad_input_raises(kwargs, match):
    full = dict(a=jnp.ones((2, 3)), b=jnp.ones((3, 4)))
    full.update(kwargs)
    with pytest.raises(ValueError, match=match):
        api.matmul(full.pop("a"), full.pop("b"), **full)


def test_bad_tiles_raise():
    with pytest.raises(ValueError, match="block_m=48 must be a power of 2"):
        TritonBlocks(block_m=48)
    with pytest.raises(ValueError, match="tile_m=96"):
        MosaicTiles(tile_m=96)
    with pytest.raises(ValueError, match="wg_dimension='k'"):
        MosaicTiles(wg_dimension="k")


def test_scaled_matmul_checks():
    a = jnp.ones((4, 4), api.FP8)
    with pytest.raises(ValueError, match="a_scale must be a scalar"):
        api.scaled_matmul(a, a, jnp.ones(3), 1.0, backend="reference")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        api.scaled_matmul(jnp.ones((4, 4)), jnp.ones((4, 4)), 1.0, 1.0)
    with pytest.raises(ValueError, match="unsupported by backend='mosaic'"):
        api.scaled_matmul(a, a, 1.0, 1.0, backend="mosaic", interpret=True)


@pytest.mark.skipif(JAX_TRITON_REASON is None, reason="jax_triton and a GPU are present")
def test_jax_triton_unavailable_names_the_reason():
    with pytest.raises(ValueError, match="backend='jax_triton' cannot run here: .*(jax_triton|GPU)"):
        api.matmul(jnp.ones((2, 3)), jnp.ones((3, 4)), backend="jax_triton")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice of backend='auto'")
def test_auto_on_cpu_without_interpret_is_the_reference():
    a, b = cases.CPU_CASES[0].inputs(jnp.float32)
    np.testing.assert_array_equal(api.matmul(a, b), api.matmul(a, b, backend="reference"))


def test_bench_smoke_and_roofline(tmp_path):
    rows = bench.rows("smoke", impls=("xla", "triton"), reps=2, log=None)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["xla"]["tflops"] > 0 and by_impl["triton"]["tflops"] > 0
    assert by_impl["xla"]["intensity"] == pytest.approx(2 * 64**3 / (3 * 64 * 64 * 2))
    path = tmp_path / "roofline.png"
    roofline.plot_roofline([dict(r, device="NVIDIA H100 80GB HBM3") for r in rows], path)
    assert path.stat().st_size > 1000


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mosaic", "jax_triton"])
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_gpu_matches_reference(case, backend):
    if backend == "jax_triton" and JAX_TRITON_REASON is not None:
        pytest.skip(JAX_TRITON_REASON)
    if backend == "mosaic" and not api._is_hopper():
        pytest.skip(f"mosaic needs sm_90; this is {jax.devices()[0].device_kind}")
    a, b = case.inputs(jnp.bfloat16)
    out = jax.jit(lambda a, b: api.matmul(a, b, backend=backend))(a, b)
    _testing.assert_close(out, reference.matmul_reference(a, b), jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "jax_triton"])
def test_gpu_float32_is_not_tf32(backend):
    """fp32 inputs multiply in fp32: Triton's dot defaults to TF32 for them (10-bit mantissas,
    ~1e-3 relative error here), which the fp32 tolerance (1e-5) catches."""
    if backend == "jax_triton" and JAX_TRITON_REASON is not None:
        pytest.skip(JAX_TRITON_REASON)
    a, b = cases.GPU_CASES[1].inputs(jnp.float32)
    out = jax.jit(lambda a, b: api.matmul(a, b, backend=backend))(a, b)
    assert out.dtype == jnp.float32
    _testing.assert_close(out, reference.matmul_reference(a, b), jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mosaic", "jax_triton"])
def test_gpu_gradients(backend):
    if backend == "jax_triton" and JAX_TRITON_REASON is not None:
        pytest.skip(JAX_TRITON_REASON)
    if backend == "mosaic" and not api._is_hopper():
        pytest.skip(f"mosaic needs sm_90; this is {jax.devices()[0].device_kind}")
    case = cases.GPU_CASES[1]
    a, b = case.inputs(jnp.bfloat16)
    dc = jnp.asarray(_testing.normal("matmul/gpu_dc", (case.m, case.n)), jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b: api.matmul(a, b, backend=backend), a, b)
    _, vjp_ref = jax.vjp(reference.matmul_reference, a.astype(jnp.float32), b.astype(jnp.float32))
    for got, want, name in zip(vjp(dc), vjp_ref(dc.astype(jnp.float32)), ("da", "db")):
        _testing.assert_close(got, want, jnp.bfloat16, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "jax_triton"])
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_gpu_scaled_fp8_matches_reference(case, backend):
    if backend == "jax_triton" and JAX_TRITON_REASON is not None:
        pytest.skip(JAX_TRITON_REASON)
    if not api._supports_fp8():
        pytest.skip(f"fp8 needs compute capability >= 8.9; this is {jax.devices()[0].device_kind}")
    a, b = case.inputs(api.FP8)
    out = jax.jit(lambda a, b: api.scaled_matmul(a, b, 0.5, 3.0, backend=backend))(a, b)  # a product != 1
    _testing.assert_close(out, reference.scaled_matmul_reference(a, b, 0.5, 3.0), jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [MosaicTiles(), MosaicTiles(wg_dimension="m", grid_minor="m"),
                                   MosaicTiles(tile_m=64, tile_n=64, tile_k=128)], ids=str)
def test_gpu_mosaic_tiles(tiles):
    if not api._is_hopper():
        pytest.skip(f"mosaic needs sm_90; this is {jax.devices()[0].device_kind}")
    a, b = cases.Case("gpu_tiles", 1536, 2560, 1024).inputs(jnp.bfloat16)
    out = api.matmul(a, b, backend="mosaic", blocks=dataclasses.replace(tiles))
    _testing.assert_close(out, reference.matmul_reference(a, b), jnp.bfloat16)
