"""Paged decode attention benchmarks: ours (Triton kernel) vs XLA (the jnp gather + attention
reference, the code a model would otherwise run) in one run; rows, no files.

GB/s counts the nominal bytes one call must move: every live key and value once, q and out.
"""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _bench
from pallas_kernels.decode_attention import api, cases

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
CASES = tuple(cases.DecodeCase(f"b{b}_s{s}", b, HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE,
                               s // PAGE_SIZE, lengths=(s,) * b) for b, s in cases.BENCH_SHAPES)
IMPLS = ("triton", "xla")


def nominal_bytes(case, dtype):
    item = jnp.dtype(dtype).itemsize
    kv = 2 * sum(case.lengths) * case.kv_heads * case.head_dim * item
    return kv + 2 * case.batch * case.heads * case.head_dim * item


def _arg_sets(case, dtype, n_sets):
    sets = []
    for i in range(n_sets):
        keys = jax.random.split(jax.random.key(i), 3)
        pages = (case.pool, case.page_size, case.kv_heads, case.head_dim)
        q = jax.random.normal(keys[0], (case.batch, case.heads, case.head_dim), dtype)
        k_pages = jax.random.normal(keys[1], pages, dtype)
        v_pages = jax.random.normal(keys[2], pages, dtype)
        tables = np.random.default_rng(i).permutation(case.pool)[: case.batch * case.pages_per_seq]
        sets.append((q, k_pages, v_pages,
                     jnp.asarray(tables.reshape(case.batch, -1), jnp.int32),
                     jnp.asarray(case.lengths, jnp.int32)))
    return sets


def _row(case, impl, dtype, reps):
    row = dict(op="decode_attention", case=case.name, impl=impl, mode="fwd",
               shape=[case.batch, case.lengths[0], case.heads, case.kv_heads, case.head_dim],
               page_size=case.page_size, dtype=jnp.dtype(dtype).name, **_bench.environment())
    backend = "triton" if impl == "triton" else "reference"
    make_fn = lambda: jax.jit(lambda *a: api.paged_decode_attention(*a, backend=backend))  # noqa: E731
    return _bench.add_bandwidth_timing(row, make_fn, lambda n: _arg_sets(case, dtype, n), reps,
                                       nbytes=nominal_bytes(case, dtype))


def rows(case_names=None, impls=IMPLS, dtype=jnp.bfloat16, reps=50):
    """One dict per (case, impl): time_ms (median of reps runs), bytes, gbps, device."""
    return [_row(c, impl, dtype, reps) for c in _bench.select(CASES, case_names) for impl in impls]
