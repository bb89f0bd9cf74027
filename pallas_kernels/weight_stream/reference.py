"""What stream_weights must return, in plain jnp."""
import jax
import jax.numpy as jnp

from pallas_kernels.weight_stream.mosaic_stream import TILE_K, TILE_N, steps_per_phase, tile_of


def last_products(weights, x, *, ctas: int, concurrent: int):
    """[ctas, 64, 8] fp32: CTA c's last tile of the last matrix times x.T."""
    w = weights[-1]
    n, k = w.shape
    last = steps_per_phase(n, k, ctas, concurrent) - 1
    out = []
    for cta in range(ctas):
        rows, cols = tile_of(cta, last, n, k, ctas)
        tile = jax.lax.dynamic_slice(w, (rows * TILE_N, cols * TILE_K), (TILE_N, TILE_K))
        out.append(jnp.matmul(tile.astype(jnp.float32), x.astype(jnp.float32).T, precision="highest"))
    return jnp.stack(out)
