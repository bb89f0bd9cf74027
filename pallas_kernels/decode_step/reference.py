"""What run_phases computes, in plain jnp."""
import jax
import jax.numpy as jnp

from pallas_kernels.decode_step.mosaic_step import _named


def run_phases(weights, norms, inputs, layer_phases, final_phases, vectors, *, layers: int, eps: float = 1e-5):
    acts = {name: jnp.zeros((v.rows, v.n), jnp.float32) for name, v in vectors.items()}
    for name, value in inputs.items():
        acts[name] = acts[name].at[0].set(value.astype(jnp.float32))

    def row(ref, layer):
        name, delta = _named(ref)
        return name, (layer + delta - vectors[name].first if vectors[name].rows > 1 else 0)

    def run(phase, layer, in_loop):
        w = weights[phase.weight][layer] if in_loop else weights[phase.weight]
        n, k = w.shape
        v = acts[row(phase.source, layer)[0]][row(phase.source, layer)[1]]
        if phase.x == "norm":
            scale = norms[phase.norm][layer if in_loop else 0]
            v = v[:k] * jax.lax.rsqrt(jnp.mean(v[:k] * v[:k]) + eps) * scale
        elif phase.x == "swiglu":
            v = jax.nn.silu(v[:k]) * v[k:2 * k]
        y = jnp.matmul(w.astype(jnp.float32), v[:k].astype(jnp.bfloat16).astype(jnp.float32), precision="highest")
        if phase.residual is not None:
            name, r = row(phase.residual, layer)
            y = y + acts[name][r, :n]
        name, r = row(phase.out, layer)
        acts[name] = acts[name].at[r, :n].add(y)

    for layer in range(layers):
        for phase in layer_phases:
            run(phase, layer, True)
    for phase in final_phases:
        run(phase, layers, False)
    return acts
