"""weight_stream: tile assignment and input checks on the CPU, the kernel lowered for Hopper on the
CPU, and run against its reference on the GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.weight_stream import reference, stream_weights
from pallas_kernels.weight_stream.mosaic_stream import TILE_K, TILE_N, steps_per_phase, tile_of

# One Llama 1.1B layer's reads: q|k|v, o, gate|up, down.
LAYER = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))


@pytest.mark.parametrize("concurrent", [1, 2, 4])
@pytest.mark.parametrize("n,k", LAYER + ((32000, 2048),))
def test_every_tile_is_read_in_whole_rounds(n, k, concurrent):
    ctas = 132
    steps = steps_per_phase(n, k, ctas, concurrent)
    assert steps % concurrent == 0 and (steps - concurrent) * ctas < (n // TILE_N) * (k // TILE_K)
    cta, step = np.meshgrid(np.arange(ctas), np.arange(steps))
    rows, cols = tile_of(cta, step, n, k, ctas)
    read = set(zip(np.ravel(rows).tolist(), np.ravel(cols).tolist()))
    assert read == {(r, c) for r in range(n // TILE_N) for c in range(k // TILE_K)}


@pytest.mark.parametrize("n,k,ctas,concurrent",
                         [(128, 512, 3, 2), (256, 256, 5, 4), (64, 1024, 8, 1), (192, 768, 4, 3)])
def test_reference_schedule_is_the_kernels(n, k, ctas, concurrent):
    """The reference works out each CTA's last tile itself; it must be the tile the kernel's
    schedule (steps_per_phase, tile_of) ends on."""
    w = jnp.asarray(_testing.normal(f"stream/sched_{n}x{k}", (n, k)), jnp.bfloat16)
    x = jnp.asarray(_testing.normal("stream/sched_x", (8, TILE_K)), jnp.bfloat16)  # one tile's columns
    got = reference.last_products([w], x, ctas=ctas, concurrent=concurrent)
    last = steps_per_phase(n, k, ctas, concurrent) - 1
    for cta in range(ctas):
        rows, cols = (int(i) for i in tile_of(cta, last, n, k, ctas))
        tile = w[rows * TILE_N:(rows + 1) * TILE_N, cols * TILE_K:(cols + 1) * TILE_K].astype(jnp.float32)
        want = jnp.matmul(tile, x.astype(jnp.float32).T, precision="highest")
        np.testing.assert_array_equal(got[cta], want)


@pytest.mark.parametrize("barriers", [True, False])
@pytest.mark.parametrize("concurrent", [2, 4])
def test_lowers_for_hopper(barriers, concurrent):
    """The layer's four reads as one persistent Mosaic GPU kernel, lowered for a GPU on this host
    (PTX needs the GPU plugin: the GPU test below compiles and runs it)."""
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in LAYER + ((8, TILE_K),)]
    lowered = jax.jit(lambda *a: stream_weights(list(a[:-1]), a[-1], concurrent=concurrent, barriers=barriers)
                      ).trace(*specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("weights,x,match", [
    ([], (8, 256), "non-empty list"),
    ([(64, 200)], (8, 256), r"\(0, \(64, 200\)"),
    ([(96, 256)], (8, 256), r"\(0, \(96, 256\)"),
    ([(64, 256)], (4, 256), r"x must be bfloat16 of shape \(8, 256\)"),
])
def test_bad_input_is_rejected(weights, x, match):
    with pytest.raises(ValueError, match=match):
        stream_weights([jnp.zeros(s, jnp.bfloat16) for s in weights], jnp.zeros(x, jnp.bfloat16))


@pytest.mark.parametrize("concurrent", [0, 7])
def test_slots_out_of_range_are_rejected(concurrent):
    with pytest.raises(ValueError, match=f"concurrent={concurrent} must be in \\[1, 6\\]"):
        stream_weights([jnp.zeros((64, 256), jnp.bfloat16)], jnp.zeros((8, 256), jnp.bfloat16), concurrent=concurrent)


def test_one_matrix_lowers():
    """A single phase is a plain pipeline (no chain to start or stop), and needs no barrier."""
    specs = (jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16), jax.ShapeDtypeStruct((8, TILE_K), jnp.bfloat16))
    lowered = jax.jit(lambda w, x: stream_weights([w], x)).trace(*specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("barriers", [True, False])
@pytest.mark.parametrize("concurrent", [2, 4])
def test_matches_reference_gpu(barriers, concurrent):
    """Phases of different step counts (the first longest, one with fewer tiles than CTAs); the
    last with between (concurrent - 1) and concurrent tiles a CTA, so the first half of the CTAs
    end on tiles of their own (the rest on the clamped last one): their offsets are checked too."""
    ctas = jax.devices()[0].core_count
    last_rows = -(-(2 * concurrent - 1) * ctas // 6)  # 3 column blocks: (concurrent - 1/2) tiles a CTA
    shapes = ((64 * 40, 2048), (128, 512), (64 * last_rows, 768))
    weights = [jnp.asarray(_testing.normal(f"stream/w{i}", s), jnp.bfloat16) for i, s in enumerate(shapes)]
    x = jnp.asarray(_testing.normal("stream/x", (8, TILE_K)), jnp.bfloat16)
    out = jax.jit(lambda w, x: stream_weights(w, x, concurrent=concurrent, barriers=barriers))(weights, x)
    expected = reference.last_products(weights, x, ctas=ctas, concurrent=concurrent)
    _testing.assert_close(out, expected, jnp.float32, "last products")
