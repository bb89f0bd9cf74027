"""The definition of `matvec` in plain jnp, fp32 arithmetic with the model's rounding points.

Each step rounds to x's dtype where the unfused decode step does (the norm's output, each
projection's output, the residual sum, rope's result). SwiGLU is computed in fp32 and rounded
once, where XLA may round silu(gate) before the product; elsewhere the kernel and the model's
layers differ only in the order of their fp32 sums.
"""
import jax
import jax.numpy as jnp


def rms_normalized(x, norm_weight, eps):
    """RMSNorm of the rows of x [B, K] with fp32 statistics, in x's dtype (as llmjax.ops.rms_norm)."""
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (x32 * rstd * norm_weight.astype(jnp.float32)).astype(x.dtype)


def quantize_rows(w, scale_dtype):
    """Symmetric absmax int8 of w [..., N, K] with one scale an output row (over K), as
    llmjax.decode.quantize makes the model's: (int8 values, scales [..., N] in scale_dtype)."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=-1) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero row
    return jnp.clip(jnp.round(w32 / scale[..., None]), -127, 127).astype(jnp.int8), scale.astype(scale_dtype)


def matvec_reference(x, w, *, w_scale=None, norm_weight=None, eps=1e-5, residual=None, gated=False,
                     out_dtype=None, rope=None):
    """See `pallas_kernels.matvec.matvec`. Returns [B, N] in out_dtype (default x's)."""
    dtype = x.dtype
    plain = not gated and residual is None
    if norm_weight is not None:
        x = rms_normalized(x, norm_weight, eps)
    weights = w if gated else w[None]  # [G, N, K]
    y = jnp.einsum("bk,gnk->gbn", x.astype(jnp.float32), weights.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    if w_scale is not None:
        y = y * (w_scale if gated else w_scale[None]).astype(jnp.float32)[:, None, :]
    y = y.astype(jnp.dtype(out_dtype or dtype) if plain else dtype)
    if gated:
        y = (jax.nn.silu(y[0].astype(jnp.float32)) * y[1].astype(jnp.float32)).astype(dtype)
    else:
        y = y[0]
    if residual is not None:
        y = (residual.astype(jnp.float32) + y.astype(jnp.float32)).astype(dtype)
    if rope is not None:
        y = rotated(y, *rope)
    return y


def rotated(y, cos, sin, rotated_heads: int):
    """Rotary embedding of y [B, N] seen as heads of H = 2 * cos.shape[-1] columns (halves layout,
    as llmjax.models.transformer.apply_rope), the first `rotated_heads` heads only; fp32 math."""
    b, n = y.shape
    half = cos.shape[-1]
    heads = y.astype(jnp.float32).reshape(b, n // (2 * half), 2, half)
    first, second = heads[:, :, 0], heads[:, :, 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    turned = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=2)
    keep = (jnp.arange(heads.shape[1]) < rotated_heads)[None, :, None, None]
    return jnp.where(keep, turned, heads).reshape(b, n).astype(y.dtype)
