"""Paged decode attention benchmarks in one run: ours (Triton kernel) vs XLA on the same pages
(`xla`: the jnp gather + attention reference, what a model would otherwise run) and XLA on a
contiguous cache of the same lengths (`xla_contiguous`: no paging at all); rows, no files.
`triton_int8` / `triton_fp8`: the kernel reading 8-bit pages with per-position scales.

GB/s counts the nominal bytes one call must move: every live key and value once, q and out.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _bench
from pallas_kernels.decode_attention import api, cases, reference

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
CASES = tuple(cases.DecodeCase(f"b{b}_s{s}", b, HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE,
                               s // PAGE_SIZE, lengths=(s,) * b) for b, s in cases.BENCH_SHAPES)
IMPLS = ("triton", "triton_int8", "triton_fp8", "xla", "xla_contiguous")
CODES = {"triton_int8": jnp.int8, "triton_fp8": jnp.float8_e4m3fn}  # 8-bit pages + bf16 scales


def nominal_bytes(case, dtype, impl="triton"):
    item = jnp.dtype(dtype).itemsize
    scale_bytes = jnp.dtype(reference.SCALE_DTYPE).itemsize
    per_head = case.head_dim + scale_bytes if impl in CODES else case.head_dim * item  # codes + a scale
    kv = 2 * sum(case.lengths) * case.kv_heads * per_head
    return kv + 2 * case.batch * case.heads * case.head_dim * item


def _arg_sets(case, dtype, n_sets, contiguous, codes=None):
    sets = []
    for i in range(n_sets):
        keys = jax.random.split(jax.random.key(i), 3)
        q = jax.random.normal(keys[0], (case.batch, case.heads, case.head_dim), dtype)
        lengths = jnp.asarray(case.lengths, jnp.int32)
        if contiguous:
            shape = (case.batch, case.pages_per_seq * case.page_size, case.kv_heads, case.head_dim)
            sets.append((q, jax.random.normal(keys[1], shape, dtype),
                         jax.random.normal(keys[2], shape, dtype), lengths))
            continue
        pages = (case.pool, case.page_size, case.kv_heads, case.head_dim)
        tables = np.random.default_rng(i).permutation(case.pool)[: case.batch * case.pages_per_seq]
        k, v = jax.random.normal(keys[1], pages, dtype), jax.random.normal(keys[2], pages, dtype)
        tables = jnp.asarray(tables.reshape(case.batch, -1), jnp.int32)
        if codes is None:
            sets.append((q, k, v, tables, lengths))
        else:
            (k, k_scales), (v, v_scales) = reference.quantize_pages(k, codes), reference.quantize_pages(v, codes)
            sets.append((q, k, v, tables, lengths, k_scales, v_scales))
    return sets


def _timed_fn(impl):
    if impl == "xla_contiguous":
        return jax.jit(lambda q, k, v, n: reference.contiguous_decode_attention(q, k, v, n).astype(q.dtype))
    backend = "triton" if impl.startswith("triton") else "reference"
    if impl in CODES:
        return jax.jit(lambda q, k, v, t, n, ks, vs: api.paged_decode_attention(
            q, k, v, t, n, k_scales=ks, v_scales=vs, backend=backend))
    return jax.jit(lambda *args: api.paged_decode_attention(*args, backend=backend))


def _row(case, impl, dtype, reps):
    row = dict(op="decode_attention", case=case.name, impl=impl, mode="fwd",
               shape=[case.batch, case.lengths[0], case.heads, case.kv_heads, case.head_dim],
               page_size=case.page_size, dtype=jnp.dtype(dtype).name, peer=not impl.startswith("triton"),
               **_bench.environment())
    contiguous = impl == "xla_contiguous"
    return _bench.add_bandwidth_timing(row, lambda: _timed_fn(impl),
                                       lambda n: _arg_sets(case, dtype, n, contiguous, CODES.get(impl)), reps,
                                       nbytes=nominal_bytes(case, dtype, impl))


def rows(case_names=None, impls=IMPLS, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl): time_ms (median of reps runs), bytes, gbps, device."""
    return [_row(c, impl, dtype, reps) for c in _bench.select(CASES, case_names) for impl in impls]
