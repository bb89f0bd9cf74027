"""What stream_weights must return, in plain jnp, with the schedule worked out here from its
definition (mosaic_stream's docstring), not taken from the kernel's helpers."""
import math

import jax.numpy as jnp

TILE_N, TILE_K = 64, 256


def last_products(weights, x, *, ctas: int, concurrent: int):
    """[ctas, 64, 8] fp32: CTA c's last tile of the last matrix times x.T. CTA c reads tiles
    c, c + ctas, ... of a phase for as many steps as the busiest CTA needs, rounded up to a
    multiple of `concurrent`; steps past the phase's last tile read that last tile again."""
    w = weights[-1]
    n, k = w.shape
    chunks = k // TILE_K
    tiles = (n // TILE_N) * chunks
    steps = math.ceil(math.ceil(tiles / ctas) / concurrent) * concurrent
    out = []
    for cta in range(ctas):
        tile = min(cta + (steps - 1) * ctas, tiles - 1)
        rows, cols = divmod(tile, chunks)
        block = w[rows * TILE_N:(rows + 1) * TILE_N, cols * TILE_K:(cols + 1) * TILE_K]
        out.append(jnp.matmul(block.astype(jnp.float32), x.astype(jnp.float32).T, precision="highest"))
    return jnp.stack(out)
