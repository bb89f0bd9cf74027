"""What run_phases computes, in plain jnp."""
import jax
import jax.numpy as jnp


def run_phases(weights, norms, h0, phases, sizes, *, eps: float = 1e-5):
    acts = {name: jnp.zeros((n,), jnp.float32) for name, n in sizes.items()}
    acts["h0"] = h0.astype(jnp.float32)
    for phase in phases:
        w = weights[phase.weight].astype(jnp.float32)
        n, k = w.shape
        v = acts[phase.source][:k]
        if phase.x == "norm":
            v = v * jax.lax.rsqrt(jnp.mean(v * v) + eps) * norms[phase.norm]
        elif phase.x == "swiglu":
            v = jax.nn.silu(v) * acts[phase.source][k:2 * k]
        y = jnp.matmul(w, v.astype(jnp.bfloat16).astype(jnp.float32), precision="highest")
        if phase.residual is not None:
            y = y + acts[phase.residual][:n]
        acts[phase.out] = acts[phase.out].at[:n].add(y)
    return {name: acts[name] for name in sizes}
