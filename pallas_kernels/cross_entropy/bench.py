"""Cross-entropy benchmarks: ours (chunked: "fused" with the Pallas chunk kernel on a GPU,
"fused_xla" with XLA's fusions between the matmuls) vs XLA materializing the logits, in one run.

Rows carry the median time, the matmul TFLOP/s (2·T·V·d per matmul: fwd 1, fwd_bwd 3) and the
compiled program's memory analysis: temp_bytes (intermediates) and peak_bytes = temp + arguments +
outputs. fwd_bwd is jax.value_and_grad with respect to hidden and vocab_weight. No files written.
"""
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.cross_entropy import api, cases, reference

CASES = cases.BENCH_CASES
IMPLS = ("fused", "fused_xla", "xla")
MODES = ("fwd", "fwd_bwd")


def matmul_flops(case, mode):
    """2·tokens·vocab·d_model per matmul; the forward has one, loss + gradients three."""
    per_matmul = 2 * math.prod(case.lead) * case.vocab * case.d_model
    return per_matmul * (1 if mode == "fwd" else 3)


def _loss_fn(impl, chunk_size):
    if impl == "xla":
        return lambda h, w, l: reference.cross_entropy(h, w, l)
    backend = "chunked" if impl == "fused_xla" else "auto"
    return lambda h, w, l: api.cross_entropy(h, w, l, chunk_size=chunk_size, backend=backend)


def _row(case, impl, mode, dtype, chunk_size, reps):
    tokens = math.prod(case.lead)
    label = impl if impl == "xla" or chunk_size is None else f"{impl}[chunk={chunk_size}]"
    row = dict(op="cross_entropy", case=case.name, impl=label, mode=mode, tokens=tokens,
               vocab=case.vocab, d_model=case.d_model, dtype=jnp.dtype(dtype).name,
               **_bench.environment())
    if impl != "xla":
        n_chunks = (api.default_n_chunks(tokens, case.vocab) if chunk_size is None
                    else -(-tokens // chunk_size))
        row.update(n_chunks=n_chunks, chunk_size=-(-tokens // n_chunks))
    try:
        kh, kw, kl = jax.random.split(jax.random.key(0), 3)
        hidden = jax.random.normal(kh, (tokens, case.d_model), jnp.float32).astype(dtype)
        weight = (jax.random.normal(kw, (case.vocab, case.d_model), jnp.float32)
                  / case.d_model ** 0.5).astype(dtype)
        labels = jax.random.randint(kl, (tokens,), 0, case.vocab)
        f = _loss_fn(impl, chunk_size)
        fn = jax.jit(f if mode == "fwd" else jax.value_and_grad(f, argnums=(0, 1)))
        memory = fn.lower(hidden, weight, labels).compile().memory_analysis()
        seconds = _bench.median_seconds(fn, [(hidden, weight, labels)], reps, warmup=2)
    except Exception as e:  # keep the other rows; the error is reported in this one
        row["error"] = _bench.error_text(e)
        return row
    row.update(_bench.throughput(seconds, flops=matmul_flops(case, mode)),
               temp_bytes=int(memory.temp_size_in_bytes),
               peak_bytes=int(memory.temp_size_in_bytes + memory.argument_size_in_bytes
                              + memory.output_size_in_bytes),
               logits_bytes=tokens * case.vocab * 4)
    return row


def rows(case_names=None, impls=IMPLS, modes=MODES, dtype=jnp.bfloat16, reps=20, chunk_sizes=(None,)):
    """One dict per (case, impl, mode) (and per chunk size for ours): time_ms, tflops, memory."""
    out = []
    for case in _bench.select(CASES, case_names):
        for impl in impls:
            for chunk_size in (chunk_sizes if impl != "xla" else (None,)):
                out += [_row(case, impl, mode, dtype, chunk_size, reps) for mode in modes]
    return out
