"""Softmax in plain jnp, computed in fp32: the definition of correct for the kernels.

Defined for every row, including rows with no finite entry: a row whose entries are all -inf gives
zeros (jax.nn.softmax gives NaN there), and its gradient is zero. +inf or NaN entries give NaN.
"""
import jax
import jax.numpy as jnp


def softmax(x, axis=-1):
    """x: any shape, float. Returns softmax along axis in x.dtype."""
    x32 = x.astype(jnp.float32)
    # The shift does not change the result; stop_gradient keeps autodiff from routing through max.
    m = jax.lax.stop_gradient(jnp.max(x32, axis=axis, keepdims=True))
    m = jnp.where(m == -jnp.inf, 0.0, m)  # all -inf row: exp(-inf - 0) = 0, no (-inf) - (-inf)
    e = jnp.exp(x32 - m)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return (e / jnp.where(total > 0, total, 1.0)).astype(x.dtype)
