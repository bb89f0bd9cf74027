"""decode_step: a chain of dependent matrix-vector phases in one persistent kernel, against its
jnp reference: in Pallas interpret mode on the CPU (one CTA), lowered for Hopper on the CPU, and
on all SMs of the GPU (K split over CTAs, grid barriers, TMA reduce-adds)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.decode_step import Attention, Phase, Vector, reference, run_phases
from pallas_kernels.decode_step import attention as attn
from pallas_kernels.decode_step.chains import llama, llama_without_attention
from pallas_kernels.decode_step.mosaic_step import _chunk_pair, default_ctas, feeding_tile, tile_share

SMALL = dict(layers=2, d=256, heads_dim=256, qkv=384, mlp=512, vocab=512)
LLAMA_1B = dict(d=2048, heads_dim=2048, qkv=2560, mlp=5632, vocab=32000)
LLAMA32_1B = dict(d=2048, mlp=8192, vocab=128256, heads=(32, 8))  # Llama 3.2 1B: 4 q heads a kv head


def _problem(name, layers, d, heads_dim, qkv, mlp, vocab):
    """(weights, norms, inputs), (layer phases, final phases, vectors), layers."""
    shapes, norm_shapes, layer_phases, final_phases, vectors = llama_without_attention(
        layers, d, heads_dim, qkv, mlp, vocab)
    weights = [jnp.asarray(_testing.normal(f"{name}/w{i}", s, scale=s[-1] ** -0.5), jnp.bfloat16)
               for i, s in enumerate(shapes)]
    norms = [jnp.asarray(_testing.normal(f"{name}/norm{i}", s, scale=0.1, shift=1.0)) for i, s in enumerate(norm_shapes)]
    inputs = {"h": jnp.asarray(_testing.normal(f"{name}/h0", (d,)))}
    return (weights, norms, inputs), (layer_phases, final_phases, vectors), layers


def _with_attention(name, layers, d, mlp, vocab, cache_len, pos, splits=1, heads=(32, 4)):
    """A Llama problem with attention over a cache holding `pos` positions (NaN past them:
    unwritten slots must not leak into the outputs), on `splits` CTAs a kv head; heads: (q, kv)."""
    shapes, norm_shapes, *chain = llama(layers, d, mlp, vocab, attention_splits=splits, q_heads=heads[0],
                                        kv_heads=heads[1])
    weights = [jnp.asarray(_testing.normal(f"{name}/w{i}", s, scale=s[-1] ** -0.5), jnp.bfloat16)
               for i, s in enumerate(shapes)]
    norms = [jnp.asarray(_testing.normal(f"{name}/norm{i}", s, scale=0.1, shift=1.0)) for i, s in enumerate(norm_shapes)]
    inputs = {"h": jnp.asarray(_testing.normal(f"{name}/h0", (d,)))}
    k, v = (np.asarray(_testing.normal(f"{name}/{kv}", (layers, cache_len, heads[1], 64))) for kv in "kv")
    k[:, pos:] = v[:, pos:] = np.nan
    cache = (jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), jnp.asarray([pos], jnp.int32),
             reference.rope(pos))
    return (weights, norms, inputs), tuple(chain), layers, cache


def _llama_specs(layers, cache_len, splits=1, d=2048, mlp=5632, vocab=32000, heads=(32, 4)):
    """A Llama's (weights, norms, inputs, cache) as shapes, and its chain (Llama 1.1B's by
    default): enough to lower."""
    shapes, norm_shapes, *chain = llama(layers, d, mlp, vocab, attention_splits=splits, q_heads=heads[0],
                                        kv_heads=heads[1])
    spec = jax.ShapeDtypeStruct
    kv = spec((layers, cache_len, heads[1], attn.HEAD_DIM), jnp.bfloat16)
    rope = spec((2, attn.HEAD_DIM // 2), jnp.float32)
    return ([spec(s, jnp.bfloat16) for s in shapes], [spec(s, jnp.float32) for s in norm_shapes],
            {"h": spec((d,), jnp.float32)}, (kv, kv, spec((1,), jnp.int32), rope)), chain


def _run(problem, **options):
    arrays, chain, layers, *cache = problem
    options.update(cache=cache[0]) if cache else None
    return jax.jit(lambda *a: run_phases(*a, *chain, layers=layers, **options))(*arrays)


def _check(out, problem, dtype=jnp.float32):
    arrays, chain, layers, *cache = problem
    expected = reference.run_phases(*arrays, *chain, layers=layers, cache=cache[0] if cache else None)
    for name in expected:
        got, want = np.asarray(out[name]), np.asarray(expected[name])
        empty = np.isneginf(want)  # the log-sum-exp of an attention split with no positions
        np.testing.assert_array_equal(np.isneginf(got), empty, err_msg=f"{name}: -inf where the reference has it")
        _testing.assert_close(np.where(empty, 0.0, got), np.where(empty, 0.0, want), dtype, name)


def test_matches_reference_interpret():
    """Norms, SwiGLU, residuals, K-split adds and the head, each phase reading the one before."""
    problem = _problem("chain/small", **SMALL)
    _check(_run(problem, interpret=True), problem)


@pytest.mark.parametrize("pos,splits,heads", [(0, 1, (32, 4)), (70, 2, (32, 4)), (130, 4, (32, 4)),
                                              (70, 2, (8, 2))])  # tests/test_decode_persistent: 70, 1
def test_with_attention_matches_reference_interpret(pos, splits, heads):
    """Attention (rotary, GQA, the cache and the new token; p in bf16: bf16 tolerance) between
    the q|k|v and o phases, for an empty cache and one ending mid-chunk; split over the cache's
    chunks and merged by the o phase, one split a chunk or with splits left empty (130
    positions, 3 chunks, 4 splits); 8 q heads a kv head (Llama 1.1B's) or 4 (Llama 3.2 1B's)."""
    problem = _with_attention(f"attn/{pos}/{splits}/{heads}", layers=2, d=256, mlp=512, vocab=512, cache_len=192,
                              pos=pos, splits=splits, heads=heads)
    _check(_run(problem, interpret=True), problem, jnp.bfloat16)


@pytest.mark.parametrize("tiles", [1, 7, 131, 132, 133, 320, 4000])
@pytest.mark.parametrize("rotation", [0, 5, 131])
def test_tile_share_takes_every_tile_once(tiles, rotation):
    """On 132 CTAs (interpret mode runs one): each tile on one CTA, (t + rotation) mod 132, and
    the CTAs' counts within one of each other."""
    ctas, taken, counts = 132, [], []
    for cta in range(ctas):
        first, count = (int(v) for v in tile_share(jnp.int32(cta), jnp.int32(rotation), tiles, ctas))
        mine = [first + i * ctas for i in range(count)]
        assert all((t + rotation) % ctas == cta for t in mine)
        taken += mine
        counts.append(count)
    assert sorted(taken) == list(range(tiles)) and max(counts) - min(counts) <= 1


def test_rotation_spreads_the_extra_tiles():
    """The rotation moves on by each phase's remainder: over Llama 1.1B's 22 layers and head on
    132 CTAs every CTA takes 478 or 479 of the 63,136 tiles (padded to the largest share of
    every phase, as chained pipelines would, a CTA would take 515)."""
    ctas, totals, rotation = 132, np.zeros(132, int), 0
    for tiles in [320, 256, 1408, 704] * 22 + [4000]:
        totals += np.asarray(tile_share(jnp.arange(ctas, dtype=jnp.int32), jnp.int32(rotation), tiles, ctas)[1])
        rotation = (rotation + tiles % ctas) % ctas
    assert totals.sum() == 63136 and set(totals) == {478, 479}


@pytest.mark.parametrize("size,fed_tiles,feeds_tiles", [(6, 32, 64), (66, 4, 8), (5, 7, 3), (5, 4, 8)])
def test_chunk_groups_pair_the_extra_tiles(size, fed_tiles, feeds_tiles):
    """A chunk group's CTAs take each of a phase's tiles of the chunk once, and the members with
    a tile fewer in the feeding phase take the extra tile in the fed one: over Llama 1.1B's
    gate|up (64 tiles a chunk) and down (32) on 6 CTAs a chunk, every CTA takes 16."""
    members = jnp.arange(size, dtype=jnp.int32)
    totals = np.zeros(size, int)
    for tiles, skip in [(feeds_tiles, 0), (fed_tiles, feeds_tiles % size)]:
        firsts, counts = (np.asarray(v) for v in tile_share(members, jnp.int32(skip), tiles, size))
        taken = sorted(int(f) + i * size for f, c in zip(firsts, counts) for i in range(int(c)))
        assert taken == list(range(tiles))
        totals += counts
    assert totals.max() - totals.min() <= 1
    if (size, fed_tiles, feeds_tiles) == (6, 32, 64):
        assert set(totals) == {16}


def test_feeding_tiles_are_the_chunks_gate_and_up_rows():
    """Chunk c of Llama 1.1B's SwiGLU x (256 of 5632 entries) is fed by gate|up's 64 tiles over
    gate rows 256 c .. 256 c + 255 and the same rows of up (5632 rows on): each once."""
    t = jnp.arange(64, dtype=jnp.int32)
    for chunk in (0, 5, 21):
        rows, cols = (np.asarray(v) for v in feeding_tile(t, jnp.int32(chunk), 2 * 5632, 2048))
        want = {(half * 88 + 4 * chunk + r, c) for half in (0, 1) for r in range(4) for c in range(8)}
        assert set(zip(rows.tolist(), cols.tolist())) == want and len(set(zip(rows, cols))) == 64


@pytest.mark.parametrize("ctas,mlp,pair", [(132, 5632, (2, 22)), (128, 5632, None), (132, 512, (2, 2)),
                                          (1, 256, None)])
def test_chunk_groups_need_a_multiple_of_the_chunks(ctas, mlp, pair):
    """gate|up feeds down by chunk groups only where the CTAs split evenly over down's 256-entry
    chunks of x (an H100's 132 over Llama 1.1B's 22) and down builds only its CTA's chunks (one
    CTA takes all of down's tiles, so builds all of x); elsewhere down waits at the grid barrier."""
    shapes, _, layer_phases, _, _ = llama(2, 2048, mlp, 32000)
    assert _chunk_pair(layer_phases, shapes, ctas) == pair


@pytest.mark.parametrize("sms,mlp,ctas", [(132, 5632, 132), (132, 8192, 128), (132, 512, 132), (129, 8192, 128),
                                          (127, 8192, 127)])
def test_default_ctas_leave_a_few_sms_idle_for_chunk_groups(sms, mlp, ctas):
    """All SMs where they form chunk groups (132 over Llama 1.1B's 22 chunks, or 2) or where no
    count within 4 below does (127 over Llama 3.2 1B's 32); else that count (128)."""
    shapes, _, layer_phases, _, _ = llama(2, 2048, mlp, 32000)
    assert default_ctas(layer_phases, shapes, sms) == ctas


def test_llama_layer_lowers_for_hopper():
    """Llama 1.1B's 22 layers and head as one kernel on an H100's 132 SMs, lowered on this host
    (PTX needs the GPU plugin: the GPU tests compile and run it)."""
    shapes, norm_shapes, *chain = llama_without_attention(22, **LLAMA_1B)
    specs = ([jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes],
             [jax.ShapeDtypeStruct(s, jnp.float32) for s in norm_shapes], {"h": jax.ShapeDtypeStruct((2048,), jnp.float32)})
    lowered = jax.jit(lambda *a: run_phases(*a, *chain, layers=22)).trace(*specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_slots_past_shared_memory_are_rejected():
    """Four slots fit beside the attention's scratch (x takes only the chunks it needs); five do not."""
    specs, chain = _llama_specs(layers=1, cache_len=64)

    def lower(concurrent):
        step = lambda w, n, i, k: run_phases(w, n, i, *chain, layers=1, cache=k, concurrent=concurrent)  # noqa: E731
        return jax.jit(step).trace(*specs)

    lower(4)
    with pytest.raises(ValueError, match=r"concurrent=5 needs ~\d+ bytes of shared memory.*use fewer slots"):
        lower(5)


@pytest.mark.parametrize("dims,splits", [(dict(), 6), (LLAMA32_1B, 8)], ids=["llama-1b", "llama3.2-1b"])
def test_llama_with_attention_lowers_for_hopper(dims, splits):
    """Llama 1.1B's shapes with six splits a kv head, or Llama 3.2 1B's (8 kv heads, MLP 8192,
    vocabulary 128,256) with eight, merged by the o phase: lowered from shapes alone."""
    specs, chain = _llama_specs(layers=2, cache_len=384, splits=splits, **dims)
    lowered = jax.jit(lambda w, n, i, c: run_phases(w, n, i, *chain, layers=2, cache=c, concurrent=2)).trace(
        *specs).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def _cache(kv_heads, layers=1, length=64, pos=3):
    """A (k, v, pos, rope) cache input of `kv_heads` heads, zeros."""
    k = jnp.zeros((layers, length, kv_heads, attn.HEAD_DIM), jnp.bfloat16)
    return k, k, jnp.array([pos], jnp.int32), reference.rope(pos)


@pytest.mark.parametrize("change,match", [
    (dict(weights=[jnp.zeros((64, 200), jnp.bfloat16)]), r"\(0, \(64, 200\)"),
    (dict(final_phases=[Phase(0, "norm", "h", "nowhere", norm=0)]), r"\(0, 'nowhere'\)"),
    (dict(final_phases=[Phase(0, "gelu", "h", "y")]), r"x \['gelu'\]"),
    (dict(final_phases=[], layers=0), r"nothing to run: layers=0"),
    (dict(final_phases=[Phase(0, "norm", "h", "y", norm=0, attention=Attention("h", "y", "y"))]),
     r"only layer phases may have it"),
    (dict(layer_phases=[Phase(0, "norm", "h", "y", norm=0, attention=Attention("h", "y", "y"))], layers=1,
          weights=[jnp.zeros((1, 64, 256), jnp.bfloat16)]),
     r"attention needs cache=\(k, v, pos, rope\).*got \(shape, dtype\) None"),
    (dict(layer_phases=[Phase(0, "norm", "h", "y", norm=0, attention=Attention("h", "y", "y"))], layers=1,
          weights=[jnp.zeros((1, 64, 256), jnp.bfloat16)], cache=_cache(kv_heads=2)),
     r"got 0 q heads over 2 kv heads"),  # h's 4 heads of 64 are only k and v
    (dict(layer_phases=[Phase(0, "norm", "h", "y", norm=0, attention=Attention("h", "y", "nowhere"))], layers=1,
          weights=[jnp.zeros((1, 64, 256), jnp.bfloat16)], cache=_cache(kv_heads=1)),
     r"\(0, 'nowhere'\)"),
    (dict(final_phases=[Phase(0, "norm", "h", "y", norm=0, rope=32)]), r"\(phase, rope\) \[\(0, 32\)\]"),
    (dict(final_phases=[Phase(0, "norm", "h", "y", norm=0, rope=128)]), r"\(phase, rope\) \[\(0, 128\)\]"),
    (dict(layers=2), r"layers=2 needs layer_phases"),
    (dict(concurrent=7), r"concurrent=7 must be in \[1, 6\]"),
])
def test_bad_input_is_rejected(change, match):
    args = dict(weights=[jnp.zeros((64, 256), jnp.bfloat16)], norms=[jnp.ones((1, 256))], inputs={"h": jnp.ones((256,))},
                layer_phases=[], final_phases=[Phase(0, "norm", "h", "y", norm=0)],
                vectors={"h": Vector(256), "y": Vector(64)}, layers=0)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        run_phases(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("concurrent", [2, 3, 4])
@pytest.mark.parametrize("dims", [SMALL, dict(layers=2, **LLAMA_1B)], ids=["small", "llama-1b-2-layers"])
def test_matches_reference_gpu(dims, concurrent):
    """On the GPU the adds land in any order, and a phase's x is rounded to bf16: an x that lands
    on the other side of a rounding step than the reference's moves the layers after it by a
    bf16 ulp, so the tolerance is bf16's (measured: 1.1e-5 after two Llama 1.1B layers). The
    Llama layers' o and down phases build only their CTAs' chunks of x; the small ones all of it."""
    problem = _problem(f"chain/{dims['d']}", **dims)
    _check(_run(problem, concurrent=concurrent), problem, jnp.bfloat16)


@pytest.mark.gpu
def test_grid_barrier_schedule_matches_reference_gpu():
    """On 128 CTAs, which do not split over Llama 1.1B's 22 chunks of down's x, gate|up and
    down keep the rotation and the grid barrier between them."""
    problem = _with_attention("attn/2048/ctas128", layers=2, d=2048, mlp=5632, vocab=32000, cache_len=384, pos=200,
                              splits=6)
    _check(_run(problem, concurrent=3, ctas=128), problem, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("pos", [0, 200])
@pytest.mark.parametrize("dims", [dict(d=256, mlp=512, vocab=512), dict(d=2048, mlp=5632, vocab=32000), LLAMA32_1B],
                         ids=["small", "llama-1b", "llama3.2-1b"])
@pytest.mark.parametrize("splits", [1, 6])
def test_with_attention_matches_reference_gpu(dims, pos, splits):
    """Two layers with attention on all SMs: kv heads (and splits of the cache) on the first
    CTAs, the others waiting at its barrier; the benchmark's 384-position cache. Llama 3.2 1B's
    shapes take the grid barrier between gate|up and down (132 CTAs over 32 chunks)."""
    problem = _with_attention(f"attn/{dims['d']}/{pos}", layers=2, cache_len=384, pos=pos, splits=splits, **dims)
    _check(_run(problem, concurrent=3), problem, jnp.bfloat16)  # generate's default
