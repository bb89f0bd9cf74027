"""RMSNorm and LayerNorm in plain jnp, computed in fp32: the definition of correct for the kernels.

RMSNorm: Zhang & Sennrich 2019, eq. 4 (no mean subtraction, no bias). LayerNorm: Ba et al. 2016.
The residual-fused forms first add the residual in fp32, normalize that fp32 sum, and also return
the sum rounded to x.dtype (the stream the next block adds to).
"""
import jax
import jax.numpy as jnp


def _normalize(s, weight, bias, *, eps, subtract_mean):
    """s: [..., hidden] fp32. Statistics over the last axis, in fp32."""
    if subtract_mean:
        s = s - jnp.mean(s, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
    y = s * rstd * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


def rms_norm(x, weight, *, eps=1e-6):
    """x: [..., hidden]; weight: [hidden]. Returns [..., hidden] in x.dtype."""
    y = _normalize(x.astype(jnp.float32), weight, None, eps=eps, subtract_mean=False)
    return y.astype(x.dtype)


def layer_norm(x, weight, bias, *, eps=1e-5):
    """x: [..., hidden]; weight, bias: [hidden] (bias may be None). Returns x.dtype."""
    y = _normalize(x.astype(jnp.float32), weight, bias, eps=eps, subtract_mean=True)
    return y.astype(x.dtype)


def rms_norm_residual(x, residual, weight, *, eps=1e-6):
    """Returns (rms_norm(x + residual), x + residual), both in x.dtype; the sum is taken in fp32."""
    s = x.astype(jnp.float32) + residual.astype(jnp.float32)
    y = _normalize(s, weight, None, eps=eps, subtract_mean=False)
    return y.astype(x.dtype), s.astype(x.dtype)


def layer_norm_residual(x, residual, weight, bias, *, eps=1e-5):
    """Returns (layer_norm(x + residual), x + residual), both in x.dtype; the sum is taken in fp32."""
    s = x.astype(jnp.float32) + residual.astype(jnp.float32)
    y = _normalize(s, weight, bias, eps=eps, subtract_mean=True)
    return y.astype(x.dtype), s.astype(x.dtype)
