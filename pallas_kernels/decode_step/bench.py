"""decode_step benchmark: Llama 1.1B's 22 layers and head (2.07 GB of bf16 weights) as one chain
of dependent phases in the persistent kernel, attention replaced by q itself, beside the bare
weight stream with grid barriers (`weight_stream`, the ceiling of this design) and XLA copying
the same bytes, in one run.

GB/s counts the weights once. bench_decode's roofline for the whole step (weights and KV cache
at the measured copy bandwidth) was 0.706 ms on an H100; 80% of it is 0.883 ms.
"""
import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.decode_step import reference, run_phases
from pallas_kernels.decode_step.chains import llama, llama_without_attention
from pallas_kernels.weight_stream import stream_weights
from pallas_kernels.weight_stream.mosaic_stream import TILE_K

LLAMA_1B = dict(d=2048, heads_dim=2048, qkv=2560, mlp=5632, vocab=32000)


def _cache(layers, length, pos):
    """A [layers, length, 4, 64] K and V cache holding `pos` positions, and the (pos, rope) inputs."""
    keys = jax.random.split(jax.random.key(1), 2)
    k, v = (jax.random.normal(key, (layers, length, 4, 64), jnp.float32).astype(jnp.bfloat16) for key in keys)
    return k, v, jnp.array([pos], jnp.int32), reference.rope(pos)


def rows(layers=22, concurrents=(2, 4), reps=10, cache_len=384, attention_splits=(1, 8)):
    """One dict per variant: the step with attention (a cache of cache_len positions, the last
    one new) per split count and the chain without it, per slot count; the bare stream at 4
    slots, the copy."""
    shapes, norm_shapes, *chain = llama_without_attention(layers, **LLAMA_1B)
    keys = jax.random.split(jax.random.key(0), len(shapes) + 2)
    weights = [(jax.random.normal(key, s, jnp.float32) * s[-1] ** -0.5).astype(jnp.bfloat16)
               for key, s in zip(keys, shapes)]
    norms = [jnp.ones(s, jnp.float32) for s in norm_shapes]
    inputs = {"h": jax.random.normal(keys[-2], (LLAMA_1B["d"],), jnp.float32)}
    x = jax.random.normal(keys[-1], (8, TILE_K), jnp.bfloat16)
    matrices = [w[layer] for layer in range(layers) for w in weights[:-1]] + weights[-1:]  # in the chain's order
    nbytes = sum(w.nbytes for w in weights)
    case = f"llama-1b-{layers}-layers"
    out = []
    cache = _cache(layers, cache_len, cache_len - 1)
    cache_bytes = 2 * cache[0][:, :cache_len - 1].nbytes
    for concurrent in concurrents:
        for splits in attention_splits:
            _, _, *step_chain = llama(layers, LLAMA_1B["d"], LLAMA_1B["mlp"], LLAMA_1B["vocab"], attention_splits=splits)
            row = dict(op="decode_step", case=case, impl=f"step[{concurrent},{splits} splits]", mode="fwd",
                       **_bench.environment())
            fn = lambda c=concurrent, chain=step_chain: jax.jit(  # noqa: E731
                lambda w, n, i, cache: run_phases(w, n, i, *chain, layers=layers, cache=cache, concurrent=c))
            out.append(_bench.add_bandwidth_timing(row, fn, lambda n: [(weights, norms, inputs, cache)], reps,
                                                   nbytes=nbytes + cache_bytes))
        row = dict(op="decode_step", case=case, impl=f"chain[{concurrent}]", mode="fwd", **_bench.environment())
        fn = lambda c=concurrent: jax.jit(  # noqa: E731
            lambda w, n, i: run_phases(w, n, i, *chain, layers=layers, concurrent=c))
        out.append(_bench.add_bandwidth_timing(row, fn, lambda n: [(weights, norms, inputs)], reps, nbytes=nbytes))
    stream = dict(op="decode_step", case=case, impl="weight_stream[4,barriers]", mode="fwd", **_bench.environment())
    out.append(_bench.add_bandwidth_timing(stream, lambda: jax.jit(lambda w, x: stream_weights(w, x, concurrent=4)),
                                           lambda n: [(matrices, x)], reps, nbytes=nbytes))
    copy = dict(op="decode_step", case=case, impl="xla_copy", mode="fwd", peer=True, **_bench.environment())
    out.append(_bench.add_bandwidth_timing(copy, lambda: jax.jit(lambda w: [a + 1 for a in w]),
                                           lambda n: [(matrices,)], reps, nbytes=2 * nbytes))
    return out
