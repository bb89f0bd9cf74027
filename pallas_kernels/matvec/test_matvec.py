"""Contract test for matvec: the Triton kernel (interpret mode on CPU, compiled on the GPU)
against the fp32 reference, for each fused neighbour, int8 weights, and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.matvec import MatvecBlocks, api, matvec, reference
SMALL = MatvecBlocks(block_n=16, block_k=32)  # several K steps at the CPU shapes
SMALL_FMA = MatvecBlocks(block_n=8, block_k=32, dot=False)
ROPE = (jnp.ones((1, 4)), jnp.zeros((1, 4)), 1)  # the bad-input cases' rotary tables: 2 heads of 8
CACHE = jnp.zeros((1, 5, 1, 8), jnp.bfloat16)
# Each fused neighbour alone, and as the decode layer combines them.
FUSIONS = {"plain": {}, "norm": dict(norm=True), "residual": dict(residual=True),
           "norm_gated": dict(norm=True, gated=True), "int8": dict(int8=True),
           "int8_norm_gated": dict(int8=True, norm=True, gated=True),
           "int8_residual": dict(int8=True, residual=True),
           "fp32_logits": dict(norm=True, out_dtype=jnp.float32),
           "norm_rope": dict(norm=True, rope=True), "int8_norm_rope": dict(int8=True, norm=True, rope=True)}
HEAD_DIM = {32: 16, 48: 16, 96: 16, 2560: 64}  # rotary head width by N in the rope cases (the last head is not turned)


def make_inputs(name, rows, k, n, dtype, norm=False, residual=False, gated=False, int8=False, out_dtype=None,
                rope=False):
    """x [rows, K], w and the other options of one call; weights ~ 1/sqrt(K), outputs O(1)."""
    x = jnp.asarray(_testing.normal(f"{name}/x", (rows, k)), dtype)
    w = jnp.asarray(_testing.normal(f"{name}/w", (2, n, k) if gated else (n, k), k ** -0.5), jnp.float32)
    options = dict(gated=gated, out_dtype=out_dtype)
    if int8:
        w, options["w_scale"] = reference.quantize_rows(w, dtype)
    else:
        w = w.astype(dtype)
    if norm:
        options["norm_weight"] = jnp.asarray(_testing.normal(f"{name}/g", (k,), 0.2, 1.0), dtype)
    if residual:
        options["residual"] = jnp.asarray(_testing.normal(f"{name}/r", (rows, n)), dtype)
    if rope:
        half = HEAD_DIM[n] // 2
        angles = jnp.asarray(_testing.normal(f"{name}/angles", (rows, half), 100.0))
        options["rope"] = (jnp.cos(angles), jnp.sin(angles), n // HEAD_DIM[n] - 1)
    return x, w, options


def _check(name, rows, k, n, dtype, fusion, interpret, blocks=None):
    x, w, options = make_inputs(name, rows, k, n, dtype, **FUSIONS[fusion])
    out = matvec(x, w, backend="triton", interpret=interpret, blocks=blocks, **options)
    ref = reference.matvec_reference(x, w, **options)
    assert out.shape == (rows, n) and out.dtype == ref.dtype
    _testing.assert_close(out, ref, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, f"{name} rows={rows}")


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA], ids=["dot", "fma"])
def test_kernel_matches_reference_bf16(fusion, rows, blocks):
    _check(f"cpu/{fusion}", rows, 128, 32, jnp.bfloat16, fusion, interpret=True, blocks=blocks)


@pytest.mark.parametrize("fusion", ["plain", "norm_gated", "residual"])
@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA], ids=["dot", "fma"])
def test_kernel_matches_reference_fp32(fusion, blocks):
    _check(f"cpu32/{fusion}", 1, 96, 16, jnp.float32, fusion, interpret=True, blocks=blocks)


@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA], ids=["dot", "fma"])
def test_k_the_step_does_not_divide_is_masked(blocks):
    _check("cpu/ragged_k", 1, 80, 16, jnp.bfloat16, "int8_norm_gated", interpret=True, blocks=blocks)


@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA], ids=["dot", "fma"])
def test_rope_heads_split_into_groups(blocks):
    """q, k, v as three outputs (head_groups) equal the one rotated result split by heads."""
    x, w, options = make_inputs("groups", 2, 64, 32, jnp.bfloat16, norm=True, rope=True)
    whole = reference.matvec_reference(x, w, **options)
    q, k = matvec(x, w, backend="triton", interpret=True, blocks=blocks, head_groups=(1, 1), **options)
    _testing.assert_close(jnp.concatenate([q, k], axis=-1), whole, jnp.bfloat16, "split q|k")
    assert q.shape == k.shape == (2, 16)
    ref_q, ref_k = matvec(x, w, backend="reference", head_groups=(1, 1), **options)
    assert jnp.array_equal(ref_q, whole[:, :16]) and jnp.array_equal(ref_k, whole[:, 16:])


def _check_cache_write(name, rows, k, n, groups, seq, slot, blocks, interpret, int8=False):
    """The last two head groups written into [rows, seq, count, H] caches at `slot` (traced): the
    slot holds the reference's heads, every other slot is unchanged bit for bit."""
    x, w, options = make_inputs(name, rows, k, n, jnp.bfloat16, norm=True, rope=True, int8=int8)
    head_dim = HEAD_DIM[n]
    caches = tuple(jnp.asarray(_testing.normal(f"{name}/cache{i}", (rows, seq, count, head_dim)), jnp.bfloat16)
                   for i, count in enumerate(groups[1:]))
    call = jax.jit(lambda x, caches, slot: matvec(x, w, backend="triton", interpret=interpret, blocks=blocks,
                                                  head_groups=groups, caches=caches, cache_slot=slot, **options))
    q, *written = call(x, caches, jnp.int32(slot))
    whole = reference.matvec_reference(x, w, **options)
    parts = jnp.split(whole, head_dim * np.cumsum(groups)[:-1], axis=-1)
    _testing.assert_close(q, parts[0], jnp.bfloat16, f"{name} q")
    for part, cache, new in zip(parts[1:], caches, written):
        assert new.shape == cache.shape and new.dtype == cache.dtype
        _testing.assert_close(new[:, slot].reshape(rows, -1), part, jnp.bfloat16, f"{name} cached slot")
        others = jnp.arange(seq) != slot
        assert jnp.array_equal(new[:, others], cache[:, others])


@pytest.mark.parametrize("rows,slot", [(1, 0), (2, 5), (3, 4)])
@pytest.mark.parametrize("blocks", [SMALL, SMALL_FMA], ids=["dot", "fma"])
def test_k_and_v_written_into_their_caches(rows, slot, blocks):
    """head_groups (q, k, v) of two heads each, with caches for k and v, at the first, the last
    and a middle slot (3 rows: padded, so written after the kernel)."""
    _check_cache_write("cpu/cache", rows, 64, 96, (2, 2, 2), seq=6, slot=slot, blocks=blocks, interpret=True)


def test_a_traced_slot_outside_the_cache_lands_where_dynamic_update_slice_puts_it():
    """-1 counts from the end, 9 is clipped to the last slot, as lax.dynamic_update_slice (the
    reference's write) does: the kernel's pointer store must not land outside its own slots."""
    x, w, options = make_inputs("cpu/clip", 1, 64, 48, jnp.bfloat16, rope=True)
    caches = (jnp.zeros((1, 4, 1, 16), jnp.bfloat16),) * 2
    call = lambda backend, slot: jax.jit(lambda slot: matvec(  # noqa: E731
        x, w, backend=backend, interpret=True, blocks=SMALL_FMA, head_groups=(1, 1, 1), caches=caches,
        cache_slot=slot, **options))(jnp.int32(slot))
    for slot, kept in ((-1, 3), (9, 3)):
        ours, ref = call("triton", slot), call("reference", slot)
        for mine, theirs in zip(ours[1:], ref[1:]):
            assert jnp.any(mine[:, kept] != 0)
            _testing.assert_close(mine, theirs, jnp.bfloat16, f"slot {slot}")


def test_rows_not_a_power_of_2_are_padded():
    _check("cpu/rows3", 3, 64, 16, jnp.bfloat16, "norm_gated", interpret=True, blocks=SMALL)


def test_shape_the_blocks_do_not_divide_falls_back_or_raises(caplog, monkeypatch):
    monkeypatch.setattr(api, "_warned", set())  # the warning is logged once a process
    x, w, _ = make_inputs("ragged", 1, 64, 24, jnp.bfloat16)
    out = matvec(x, w, interpret=True, blocks=SMALL)  # N = 24: not a multiple of block_n = 16
    _testing.assert_close(out, reference.matvec_reference(x, w), jnp.bfloat16)
    assert "block_n" in caplog.text
    with pytest.raises(ValueError, match="N=24 is not a multiple of block_n=16"):
        matvec(x, w, backend="triton", interpret=True, blocks=SMALL)


@pytest.mark.parametrize("call,message", [
    (lambda x, w: matvec(x[0], w), r"x must be \[rows, K\]"),
    (lambda x, w: matvec(jnp.zeros((17, 64), jnp.bfloat16), w), "rows <= 16"),
    (lambda x, w: matvec(x, w[:, :32]), "K = x.shape"),
    (lambda x, w: matvec(x, w, gated=True), r"\[2, N, K\]"),
    (lambda x, w: matvec(x, w.astype(jnp.float32)), "must be x's"),
    (lambda x, w: matvec(x, w.astype(jnp.int8)), "w_scale goes with an int8 w"),
    (lambda x, w: matvec(x, w.astype(jnp.int8), w_scale=jnp.ones((3,))), r"w_scale must be a float array \(16,\)"),
    (lambda x, w: matvec(x, w.astype(jnp.int8), w_scale=jnp.ones((16,), jnp.int32)), "w_scale must be a float"),
    (lambda x, w: matvec(x, w, norm_weight=jnp.ones((3,), jnp.bfloat16)), r"norm_weight must be a float array \[64\]"),
    (lambda x, w: matvec(x, w, residual=[[0.0] * 16]), r"residual must be \[1, 16\]"),
    (lambda x, w: matvec(x, w, out_dtype=jnp.int32), "out_dtype=int32 unsupported"),
    (lambda x, w: matvec(x, w, norm_weight=jnp.ones((64,), jnp.bfloat16), eps=-1e-5), "eps=-1e-05 must be a positive"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 8)), jnp.ones((1, 8)), True)), "rotated_heads=True"),
    (lambda x, w: matvec(x, w, residual=jnp.ones((1, 3), jnp.bfloat16)), r"residual must be \[1, 16\]"),
    (lambda x, w: matvec(x, w, residual=jnp.ones((1, 16), jnp.bfloat16), out_dtype=jnp.float32), "plain projection"),
    (lambda x, w: matvec(x, w, backend="cuda"), "backend='cuda' unknown"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 8)),) * 2), r"rope must be \(cos, sin, rotated_heads\)"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 8)), jnp.ones((1, 8)), 0),
                         residual=jnp.ones((1, 16), jnp.bfloat16)), "not with gated or residual"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 8)), jnp.ones((1, 8)), 3)), "rotated_heads=3"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 6)), jnp.ones((1, 6)), 0)), "whole heads"),
    (lambda x, w: matvec(x, w, rope=(jnp.ones((1, 4)), jnp.ones((1, 4)), 0), head_groups=(1, 2)), "summing to the 2"),
    (lambda x, w: matvec(x, w, head_groups=(1,)), "needs rope"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=[CACHE], cache_slot=0), "caches must be a tuple"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE, CACHE), cache_slot=0),
     "caches must be a tuple of 1 to"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE[:, :, :, :4],), cache_slot=0),
     "head_dim=8"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE.astype(jnp.float32),), cache_slot=0),
     "of x's dtype"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE,), cache_slot=5), "cache_slot=5 is outside"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE,), cache_slot=1.0), "must be an int scalar"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), cache_slot=0), "cache_slot goes with caches"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE,), cache_slot=-1), "cache_slot=-1 is outside"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(CACHE[0],), cache_slot=0),
     r"caches\[0\] must be .* got shape \(5, 1, 8\)"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(None,), cache_slot=0), r"caches\[0\] must be"),
    (lambda x, w: matvec(x, w, rope=ROPE, head_groups=(1, 1), caches=(jnp.zeros((2, 5, 1, 8), jnp.bfloat16),),
                         cache_slot=0), r"rows=1"),
    (lambda x, w: matvec(x, jnp.concatenate([w, w[:8]]), rope=(jnp.ones((1, 4)), jnp.zeros((1, 4)), 1), head_groups=(1, 1, 1),
                         caches=(CACHE, CACHE[:, :4]), cache_slot=0), r"caches\[1\] must be .* one S for all"),
    (lambda x, w: matvec(x, w, blocks=(16, 32)), "must be a config.MatvecBlocks"),
])
def test_bad_input_names_the_value(call, message):  # ROPE: 2 heads of 8 over N = 16
    x, w, _ = make_inputs("bad", 1, 64, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        call(x, w)


def test_numpy_ints_count_as_heads():
    x, w, options = make_inputs("np-int", 1, 64, 32, jnp.bfloat16, rope=True)
    cos, sin, heads = options.pop("rope")
    out = matvec(x, w, rope=(cos, sin, np.int64(heads)), head_groups=(np.int32(1), 1), interpret=True,
                 blocks=SMALL, **options)
    _testing.assert_close(jnp.concatenate(out, axis=-1),
                          reference.matvec_reference(x, w, rope=(cos, sin, heads), **options), jnp.bfloat16)


def test_default_blocks_take_any_width():
    """K under 16 with several rows still gives valid tensor-core blocks (the step is masked)."""
    x = jnp.ones((2, 8), jnp.bfloat16)
    w = jnp.ones((16, 8), jnp.bfloat16)
    _testing.assert_close(matvec(x, w, interpret=True), reference.matvec_reference(x, w), jnp.bfloat16)


def test_blocks_are_checked():
    with pytest.raises(ValueError, match="block_n=24 must be a power of 2"):
        MatvecBlocks(block_n=24)
    with pytest.raises(ValueError, match=">= 16 with dot=True"):
        MatvecBlocks(block_n=8)
    assert MatvecBlocks(block_n=8, dot=False).block_n == 8


# Each fusion at the Llama 1.1B decode shape that uses it (D 2048, q|k|v 2560, F 5632, V 32000),
# compiled, and GPT-2 small's fused q|k|v width (D 768).
GPU_CASES = [("plain", 768, 2304), ("norm", 2048, 2560), ("residual", 2048, 2048), ("norm_gated", 2048, 5632),
             ("int8", 2048, 2560), ("int8_norm_gated", 2048, 5632), ("int8_residual", 5632, 2048),
             ("fp32_logits", 2048, 32000), ("norm_rope", 2048, 2560), ("int8_norm_rope", 2048, 2560)]


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2])
def test_rope_heads_split_into_q_k_v_gpu(int8, rows):
    x, w, options = make_inputs("gpu/groups", rows, 2048, 2560, jnp.bfloat16, norm=True, rope=True, int8=int8)
    q, k, v = matvec(x, w, backend="triton", head_groups=(32, 4, 4), **options)
    whole = reference.matvec_reference(x, w, **options)
    _testing.assert_close(jnp.concatenate([q, k, v], axis=-1), whole, jnp.bfloat16, "split q|k|v")


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2])
def test_k_and_v_written_into_their_caches_gpu(int8, rows):
    fma = MatvecBlocks(block_n=4, block_k=2048, dot=False, num_stages=1)
    _check_cache_write("gpu/cache", rows, 2048, 2560, (32, 4, 4), seq=384, slot=200, blocks=fma,
                       interpret=False, int8=int8)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion,k,n", GPU_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("dot", [True, False], ids=["dot", "fma"])
def test_kernel_matches_reference_gpu(fusion, k, n, rows, dot):
    blocks = MatvecBlocks(block_n=16 if dot else 4, block_k=512 if dot else 2048, dot=dot)  # FMA: K 768, 5632 masked
    _check(f"gpu/{fusion}/{k}x{n}", rows, k, n, jnp.bfloat16, fusion, interpret=False, blocks=blocks)
