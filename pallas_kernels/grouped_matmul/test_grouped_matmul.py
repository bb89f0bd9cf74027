"""Grouped matmul vs the fp32 loop over groups: the Pallas Triton kernels in interpret mode and
the Mosaic GPU rows kernel in the GPU interpreter (forward, dX, dW), the padded layout, lowering
to Triton IR / Mosaic GPU for an abstract H100, input checks, and gpu-marked tests at real sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.grouped_matmul import api, bench, cases, layout, reference
from pallas_kernels.matmul.config import MosaicTiles, TritonBlocks

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=3)
MOSAIC_CASE = cases.Case("mosaic_150x128x200_empty_group", 150, 128, 200, (70, 0, 60),
                         blocks=MosaicTiles(tile_m=64, tile_n=64, max_concurrent_steps=2,
                                            grid_tile_width=2))


def abstract_h100():
    """An abstract H100 mesh: the Mosaic interpreter and cross-lowering read the GPU from it."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100))


def _check_forward_and_grads(case, dtype, fn):
    """fn(x, w, group_sizes) against the reference: output and the vjp of a random cotangent."""
    x, w, group_sizes = case.inputs(dtype)
    dy = case.cotangent(dtype)
    y, vjp = jax.vjp(lambda x, w: fn(x, w, group_sizes), x, w)
    ref = lambda x, w: reference.grouped_matmul_reference(x, w, group_sizes)  # noqa: E731
    y_ref, vjp_ref = jax.vjp(ref, x.astype(jnp.float32), w.astype(jnp.float32))
    assert y.shape == (case.m, case.n) and y.dtype == dtype
    _testing.assert_close(y, y_ref, dtype, "y")
    for got, want, name in zip(vjp(dy), vjp_ref(dy.astype(jnp.float32)), ("dx", "dw")):
        assert got.dtype == dtype, name
        _testing.assert_close(got, want, dtype, name)


@pytest.mark.parametrize("case,dtype", [(cases.CPU_CASES[0], jnp.float32),
                                        (cases.CPU_CASES[1], jnp.bfloat16)],
                         ids=lambda v: getattr(v, "name", None) or jnp.dtype(v).name)
def test_triton_interpret_forward_and_grads_match_reference(case, dtype):
    fn = lambda x, w, gs: api.grouped_matmul(x, w, gs, backend="triton", interpret=True,  # noqa: E731
                                             blocks=case.blocks)
    _check_forward_and_grads(case, dtype, jax.jit(fn))


def test_mosaic_interpret_forward_and_grads_match_reference():
    """Mosaic rows kernel (forward, and dX on W transposed) in the GPU interpreter, Triton dW;
    N = 200 pads to the CTA's 128 columns, rows past the last group give 0."""
    case = MOSAIC_CASE
    fn = lambda x, w, gs: api.grouped_matmul(x, w, gs, backend="mosaic", interpret=True,  # noqa: E731
                                             blocks=case.blocks)
    with abstract_h100():
        _check_forward_and_grads(case, jnp.bfloat16, fn)


def test_xla_backend_is_ragged_dot_and_rows_past_the_groups_are_zero():
    case = cases.CPU_CASES[0]
    x, w, group_sizes = case.inputs(jnp.float32)
    y = api.grouped_matmul(x, w, group_sizes, backend="xla")
    _testing.assert_close(y, reference.grouped_matmul_reference(x, w, group_sizes), jnp.float32)
    assert not np.any(np.asarray(y)[sum(case.group_sizes):])


def test_layout_places_each_group_in_whole_tiles():
    row_group = jnp.array([2, 0, 4, 2, 2, 0, 1, 4, 2, 2, 2])  # G = 4: id 4 is "no group"
    lay = layout.make_layout(row_group, 4, tile_m=4)
    p = layout.padded_rows(11, 4, 4)
    assert lay.padded_source.shape == (p,) and p % 4 == 0 and p >= 11 + 4 * 3
    np.testing.assert_array_equal(lay.group_tiles, [1, 1, 2, 0])
    np.testing.assert_array_equal(lay.group_first_tile, [0, 1, 2, 4])
    np.testing.assert_array_equal(lay.tile_group, [0, 1, 2, 2] + [4] * (p // 4 - 4))
    position = np.asarray(lay.row_position)
    np.testing.assert_array_equal(position[[2, 7]], [p, p])  # rows in no group are not placed
    np.testing.assert_array_equal(position[[1, 5, 6, 0, 3, 4, 8, 9, 10]], [0, 1, 4, 8, 9, 10, 11, 12, 13])
    x = jnp.asarray(_testing.normal("layout/x", (11, 3)))
    xp = layout.pad_rows(x, lay)
    np.testing.assert_array_equal(np.asarray(xp)[[2, 3, 5, 14, 15]], 0)  # padding slots
    back = np.asarray(layout.unpad_rows(xp, lay))
    np.testing.assert_array_equal(back[[2, 7]], 0)
    keep = [0, 1, 3, 4, 5, 6, 8, 9, 10]
    np.testing.assert_array_equal(back[keep], np.asarray(x)[keep])
    # The gathers' gradients are each other: d pad_rows = unpad_rows of the cotangent.
    dxp = jnp.asarray(_testing.normal("layout/dxp", xp.shape))
    (dx,) = jax.vjp(lambda x: layout.pad_rows(x, lay), x)[1](dxp)
    np.testing.assert_array_equal(dx, layout.unpad_rows(dxp, lay))


@pytest.mark.parametrize("backend,triton_calls", [("triton", 3), ("mosaic", 1)])
def test_kernels_lower_for_gpu(backend, triton_calls):
    """Forward, dX and dW kernels lower without a GPU: Triton IR for every kernel, or Mosaic GPU
    modules for the rows kernels and Triton for dW."""
    m, k, n, g = 1000, 256, 384, 8
    x, w = jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((g, k, n), jnp.bfloat16)
    group_sizes = jnp.full((g,), m // g, jnp.int32)

    def forward_backward(x, w, group_sizes):
        lay = layout.layout_from_sizes(group_sizes, m, 128)
        static = api._Static(backend, jnp.dtype(jnp.bfloat16), None, False)
        fn = lambda xp, w: api._kernel_matmul(xp, w, lay.tile_group, lay.group_first_tile,  # noqa: E731
                                              lay.group_tiles, static)
        y, vjp = jax.vjp(fn, layout.pad_rows(x, lay), w)
        return vjp(y)

    with abstract_h100():
        text = jax.jit(forward_backward).trace(x, w, group_sizes).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == triton_calls
    assert ("mosaic_gpu" in text) == (backend == "mosaic")


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=jnp.ones((4, 3, 2))), "x must be rank 2"),
    (dict(w=jnp.ones((3, 4))), "w must be rank 3"),
    (dict(w=jnp.ones((2, 5, 4))), "x's columns must equal w's K"),
    (dict(w=jnp.ones((2, 3, 4), jnp.bfloat16)), "w.dtype=bfloat16"),
    (dict(group_sizes=jnp.ones((3,), jnp.int32)), r"group_sizes must be an int array of shape \(2,\)"),
    (dict(group_sizes=jnp.ones((2,))), "group_sizes must be an int array"),
    (dict(backend="cuda"), "backend='cuda' unknown"),
    (dict(backend="triton"), "needs a GPU"),
    (dict(backend="mosaic", interpret=True), "dtype=float32 unsupported by backend='mosaic'"),
    (dict(backend="triton", interpret=True, blocks=MosaicTiles()), "takes blocks of type TritonBlocks"),
    (dict(out_dtype=jnp.int8), "out_dtype=int8"),
])
def test_bad_input_raises(kwargs, match):
    full = dict(x=jnp.ones((4, 3)), w=jnp.ones((2, 3, 4)), group_sizes=jnp.array([1, 3], jnp.int32))
    full.update(kwargs)
    with pytest.raises(ValueError, match=match):
        api.grouped_matmul(full.pop("x"), full.pop("w"), full.pop("group_sizes"), **full)


def test_padded_blocks_must_match_the_layout():
    lay = layout.make_layout(jnp.array([0, 1, 1]), 2, tile_m=16)
    xp = jnp.ones((lay.padded_source.shape[0], 8))
    with pytest.raises(ValueError, match="row tile 32 .* must equal the layout's tile_m=16"):
        api.padded_grouped_matmul(xp, jnp.ones((2, 8, 8)), lay, interpret=True,
                                  blocks=TritonBlocks(block_m=32))


def test_bench_smoke():
    rows = bench.rows("smoke", impls=("xla_ragged", "triton"), modes=("fwd",), reps=1, log=None)
    assert {r["impl"] for r in rows} == {"xla_ragged", "triton"}
    assert all(r.get("tflops", 0) > 0 for r in rows), [r.get("error") for r in rows]


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mosaic"])
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_gpu_forward_and_grads_match_reference(case, backend):
    if backend == "mosaic" and getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        pytest.skip(f"mosaic needs sm_90; this is {jax.devices()[0].device_kind}")
    fn = lambda x, w, gs: api.grouped_matmul(x, w, gs, backend=backend)  # noqa: E731
    _check_forward_and_grads(case, jnp.bfloat16, jax.jit(fn))


@pytest.mark.parametrize("hopper, dtype, expected", [
    (True, jnp.bfloat16, "mosaic"), (True, jnp.float16, "mosaic"), (True, jnp.float32, "triton"),
    (False, jnp.bfloat16, "triton")])
def test_auto_backend_takes_mosaic_on_hopper_for_16_bit(monkeypatch, hopper, dtype, expected):
    monkeypatch.setattr(api, "_targets_hopper", lambda: hopper)
    assert api.auto_backend(dtype) == expected
