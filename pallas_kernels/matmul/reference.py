"""The definition of correct: plain jnp matmuls in fp32."""
import jax.numpy as jnp


def matmul_reference(a, b):
    """[M, K] @ [K, N] -> [M, N] fp32, inputs upcast to fp32, full-precision products."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                      precision="highest")


def scaled_matmul_reference(a, b, a_scale, b_scale):
    """(a * a_scale) @ (b * b_scale) in fp32: the meaning of an fp8 matmul with per-tensor scales
    (a, b hold values divided by their scales)."""
    return matmul_reference(a, b) * (jnp.float32(a_scale) * jnp.float32(b_scale))
