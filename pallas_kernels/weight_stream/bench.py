"""weight_stream benchmark: a persistent kernel streaming Llama 1.1B's weights (22 layers of
q|k|v, o, gate|up, down, then the head: 2.07 GB) against XLA copying the same bytes, in one run.

GB/s counts the weights once (the nominal bytes of a decode step's reads); the copy row counts
its reads and writes, as bench_decode's roofline does. The matvec loop's weight reads took
0.96 ms a token on an H100 (benchmarks/NOTES.md), 0.706 ms being the roofline.
"""
import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.weight_stream import stream_weights
from pallas_kernels.weight_stream.mosaic_stream import TILE_K

LAYER = ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632))
HEAD = (32000, 2048)


def _weights(layers):
    shapes = list(LAYER) * layers + [HEAD]
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    weights = [jax.random.normal(key, s, jnp.bfloat16) for key, s in zip(keys, shapes)]
    return weights, jax.random.normal(keys[-1], (8, TILE_K), jnp.bfloat16)


def rows(layers=22, concurrents=(2, 4), reps=10):
    """One dict per variant: the stream with and without grid barriers per slot count, and the copy."""
    weights, x = _weights(layers)
    nbytes = sum(w.nbytes for w in weights)
    case = f"llama-1b-{layers}-layers"
    out = []
    for concurrent in concurrents:
        for barriers in (True, False):
            row = dict(op="weight_stream", case=case, impl=f"stream[{concurrent},{'barriers' if barriers else 'free'}]",
                       mode="fwd", **_bench.environment())
            fn = lambda c=concurrent, b=barriers: jax.jit(  # noqa: E731
                lambda w, x: stream_weights(w, x, concurrent=c, barriers=b))
            out.append(_bench.add_bandwidth_timing(row, fn, lambda n: [(weights, x)], reps, nbytes=nbytes))
    copy = dict(op="weight_stream", case=case, impl="xla_copy", mode="fwd", peer=True, **_bench.environment())
    out.append(_bench.add_bandwidth_timing(copy, lambda: jax.jit(lambda w, x: [a + 1 for a in w]),
                                           lambda n: [(weights, x)], reps, nbytes=2 * nbytes))
    return out
