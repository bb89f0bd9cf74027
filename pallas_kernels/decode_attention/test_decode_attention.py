"""Contract test for paged decode attention: kernel and reference against contiguous attention."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels._triton import MIN_DOT_ROWS
from pallas_kernels.decode_attention import cases, config, paged_decode_attention, reference, triton_decode

ON_GPU = jax.default_backend() == "gpu"
BACKENDS = [("reference", False), ("triton", not ON_GPU)]
DTYPES = [jnp.float32, jnp.bfloat16]


def make_inputs(case, dtype):
    """Contiguous k, v [B, S, K, H] and the same values scattered into pages through a random
    permutation of the pool; returns q, k, v, k_pages, v_pages, block_tables, lengths."""
    b, m, bs = case.batch, case.pages_per_seq, case.page_size
    s = m * bs
    q = _testing.normal(f"{case.name}/q", (b, case.heads, case.head_dim))
    k = _testing.normal(f"{case.name}/k", (b, s, case.kv_heads, case.head_dim))
    v = _testing.normal(f"{case.name}/v", (b, s, case.kv_heads, case.head_dim))
    rng = np.random.default_rng(_testing.seed(case.name))
    tables = rng.permutation(case.pool)[: b * m].reshape(b, m)
    lengths = case.lengths or tuple(rng.integers(1, s + 1, size=b))
    k_pages = np.zeros((case.pool, bs, case.kv_heads, case.head_dim), np.float32)
    v_pages = np.zeros_like(k_pages)
    k_pages[tables.reshape(-1)] = k.reshape(b * m, bs, *k.shape[2:])
    v_pages[tables.reshape(-1)] = v.reshape(b * m, bs, *v.shape[2:])
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), cast(k_pages), cast(v_pages), jnp.asarray(tables, jnp.int32),
            jnp.asarray(lengths, jnp.int32))


def _check(case, dtype, backend, interpret, blocks=None, counts=None):
    """The kernel against contiguous attention. counts: [B, K] int32 zeros, passed as split_counts
    twice in a row (the second call gets the counts the first returned, zeros again)."""
    q, k, v, k_pages, v_pages, tables, lengths = make_inputs(case, dtype)
    attend = jax.jit(functools.partial(paged_decode_attention, backend=backend,
                                       interpret=interpret, blocks=blocks))
    # The twin: contiguous attention on the un-paged keys (fp32, from the same rounded values).
    expected = jax.jit(reference.contiguous_decode_attention)(q, k, v, lengths)
    for _ in range(1 if counts is None else 2):
        if counts is None:
            out = attend(q, k_pages, v_pages, tables, lengths)
        else:
            out, counts = attend(q, k_pages, v_pages, tables, lengths, split_counts=counts)
            assert not np.any(np.asarray(counts)), "the last split program leaves its count at zero"
        assert out.shape == q.shape and out.dtype == dtype
        _testing.assert_close(out, expected, dtype, f"{case.name} {backend}")
        idle = np.asarray(lengths) == 0
        assert np.all(np.asarray(out, np.float32)[idle] == 0), "length-0 rows must be zeros"


@pytest.mark.parametrize("backend,interpret", BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_matches_contiguous(case, dtype, backend, interpret):
    _check(case, dtype, backend, interpret)


def test_split_merge_matches_contiguous():
    """Several splits of two-page steps (the flash-decoding merge) on the ragged GQA case."""
    blocks = config.DecodeBlocks(pages_per_step=2, pages_per_split=2)
    _check(cases.CPU_CASES[0], jnp.float32, "triton", not ON_GPU, blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_merge_in_kernel_matches_contiguous(case, dtype, monkeypatch):
    """One split a page (3-6 of them, not a power of 2 for most cases), merged by the split
    program that counts last; idle rows (length 0) and splits past a length merge to zeros.
    The interpreter runs the splits in order, so which program arrives last varies only on a GPU."""
    merged = _testing.record_split_merges(monkeypatch)
    _check(case, dtype, "triton", not ON_GPU, config.DecodeBlocks(pages_per_step=1, pages_per_split=1),
           counts=jnp.zeros((case.batch, case.kv_heads), jnp.int32))
    assert merged == [True], "the kernel did not merge its splits"


def test_merge_stays_after_the_kernel_where_partials_would_spill(monkeypatch):
    """Past MAX_MERGE_VALUES_PER_THREAD the merge runs after the kernel and the counts pass through."""
    monkeypatch.setattr(triton_decode, "MAX_MERGE_VALUES_PER_THREAD", 1)
    merged = _testing.record_split_merges(monkeypatch)
    case = cases.CPU_CASES[0]
    _check(case, jnp.float32, "triton", not ON_GPU, config.DecodeBlocks(pages_per_step=1, pages_per_split=1),
           counts=jnp.zeros((case.batch, case.kv_heads), jnp.int32))
    assert merged == [False]


def test_merge_in_kernel_rejects_bad_counts():
    case = cases.CPU_CASES[0]
    q, _, _, k_pages, v_pages, tables, lengths = make_inputs(case, jnp.float32)
    with pytest.raises(ValueError, match=r"split_counts must be int32 of shape \(batch, kv_heads\) = \(3, 2\)"):
        paged_decode_attention(q, k_pages, v_pages, tables, lengths, interpret=True,
                               split_counts=jnp.zeros((3, 4), jnp.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_one_split_needs_no_merge(case, dtype, monkeypatch):
    """A split over the whole table (here in two-page steps) writes the result in q's dtype, and
    no merge runs after it; more splits are merged."""
    def no_merge(*args):
        raise AssertionError("one split was merged")

    monkeypatch.setattr(triton_decode, "merge_splits", no_merge)
    table = 1 << (case.pages_per_seq - 1).bit_length()
    _check(case, dtype, "triton", not ON_GPU, config.DecodeBlocks(pages_per_step=2, pages_per_split=table))
    q, _, _, k_pages, v_pages, tables, lengths = make_inputs(case, dtype)
    group = case.heads // case.kv_heads
    qg = q.reshape(case.batch, case.kv_heads, group, case.head_dim)
    if group & (group - 1):
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, MIN_DOT_ROWS - group), (0, 0)))
    split_tables = jnp.pad(tables, ((0, 0), (0, table - case.pages_per_seq)))
    for splits in (1, 2):
        o, m, l = triton_decode.decode_partials(
            qg, k_pages, v_pages, split_tables.reshape(case.batch, splits, table // splits),
            lengths.reshape(-1, 1), scale=0.25, blocks=config.DecodeBlocks(pages_per_step=1, pages_per_split=table // splits),
            interpret=not ON_GPU)
        assert o.shape[2] == splits and o.dtype == (dtype if splits == 1 else jnp.float32)


def test_reference_matches_jax_attention():
    """The contiguous reference against jax.nn.dot_product_attention with key lengths (fp32
    matmuls asked for: on a GPU XLA's default is TF32, which this fp32 tolerance rejects)."""
    case = cases.CPU_CASES[1]
    q, k, v, *_, lengths = make_inputs(case, jnp.float32)
    ours = jax.jit(reference.contiguous_decode_attention)(q, k, v, lengths)
    with jax.default_matmul_precision("highest"):
        theirs = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=n)[:, 0])(q, k, v, lengths)
    _testing.assert_close(ours, theirs, jnp.float32)


@pytest.mark.parametrize("bad,match", [
    (dict(q=jnp.zeros((2, 4, 16, 1))), "q must be rank 3"),
    (dict(q=jnp.zeros((2, 3, 16))), "heads=3 is not divisible by kv_heads=2"),
    (dict(lengths=jnp.zeros((2,), jnp.float32)), "lengths must be an int array"),
    (dict(block_tables=jnp.zeros((3, 2), jnp.int32)), r"block_tables.shape\[0\]=3"),
    (dict(backend="cuda"), "backend='cuda' unknown"),
])
def test_bad_input_is_rejected(bad, match):
    args = dict(q=jnp.zeros((2, 4, 16)), k_pages=jnp.zeros((5, 8, 2, 16)),
                v_pages=jnp.zeros((5, 8, 2, 16)), block_tables=jnp.zeros((2, 2), jnp.int32),
                lengths=jnp.ones((2,), jnp.int32), backend="reference")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                               args.pop("block_tables"), args.pop("lengths"), **args)


def test_named_triton_backend_rejects_unsupported_head_dim():
    q, k_pages = jnp.zeros((1, 4, 24)), jnp.zeros((3, 8, 2, 24))
    with pytest.raises(ValueError, match="head_dim=24 is not a power of 2"):
        paged_decode_attention(q, k_pages, k_pages, jnp.zeros((1, 2), jnp.int32),
                               jnp.ones((1,), jnp.int32), backend="triton", interpret=True)


def test_kernel_rejects_rows_it_cannot_repeat_to_16():
    """The kernel repeats a power-of-2 group under 16 rows; 3 rows must come padded."""
    pages = jnp.zeros((3, 8, 1, 16))
    with pytest.raises(ValueError, match="3 rows a kv head: under 16 they must be a power of 2"):
        triton_decode.decode_partials(jnp.zeros((1, 1, 3, 16)), pages, pages,
                                      jnp.zeros((1, 1, 2), jnp.int32), jnp.ones((1, 1), jnp.int32),
                                      scale=0.25, blocks=config.DecodeBlocks(pages_per_step=1,
                                                                             pages_per_split=2),
                                      interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("merge_in_kernel", [False, True], ids=["merge_after", "merge_in_kernel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_matches_contiguous_gpu(case, dtype, merge_in_kernel, monkeypatch):
    merged = _testing.record_split_merges(monkeypatch)
    _check(case, dtype, "triton", False,
           counts=jnp.zeros((case.batch, case.kv_heads), jnp.int32) if merge_in_kernel else None)
    assert merged == [merge_in_kernel]


@pytest.mark.gpu
@pytest.mark.parametrize("codes", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_quantized_pages_match_reference_gpu(case, codes):
    """The kernel on 8-bit pages with scales against the reference on the same codes (bf16 q)."""
    q, _, _, k_pages, v_pages, tables, lengths = make_inputs(case, jnp.float32)
    (k8, ks), (v8, vs) = reference.quantize_pages(k_pages, codes), reference.quantize_pages(v_pages, codes)
    q = q.astype(jnp.bfloat16)
    out = jax.jit(functools.partial(paged_decode_attention, backend="triton"))(
        q, k8, v8, tables, lengths, k_scales=ks, v_scales=vs)
    expected = reference.paged_decode_attention_reference(q, k8, v8, tables, lengths, k_scales=ks, v_scales=vs)
    _testing.assert_close(out, expected, jnp.bfloat16, f"{case.name} {jnp.dtype(codes).name}")
