"""Fused residual add + RMSNorm forward written in Triton itself, called through jax_triton.triton_call.

The same computation as pallas_kernels.norms.rms_norm_residual's forward (reference:
pallas_kernels.norms.reference.rms_norm_residual), one row per program, fp32 statistics. Forward only:
triton_call has no autodiff rule, so this is for inference and for comparing the Triton toolchain
with Pallas' Triton lowering. Needs the optional extra `triton` (jax-triton 0.3.1, which works with
triton 3.6; jax-triton 0.4.x needs triton >= 3.7) and a CUDA GPU.
"""
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _api

MAX_BLOCK = 16384  # one row per program, held in registers


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (None if it can)."""
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except ImportError as e:
        return (f"jax_triton/triton not importable ({e}); install the optional extra: "
                "pip install -e '.[triton]'")
    if jax.default_backend() != "gpu":
        return f"needs a CUDA GPU (default backend is {jax.default_backend()!r})"
    return None


@functools.cache
def _kernel():
    """The @triton.jit kernel, built on first use so that importing this module needs no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_residual_kernel(x_ptr, residual_ptr, weight_ptr, y_ptr, sum_ptr, n_cols,
                                 eps: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # int64: rows * n_cols may pass 2**31
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        offsets = row * n_cols + cols
        s = (tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
             + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        tl.store(sum_ptr + offsets, s.to(sum_ptr.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, (s * rstd * weight).to(y_ptr.dtype.element_ty), mask=mask)

    return rms_norm_residual_kernel


def rms_norm_residual(x, residual, weight, *, eps=1e-6):
    """s = x + residual (fp32), returns (rms_norm(s) * weight, s), via a Triton kernel.

    Args:
      x, residual: [..., hidden], same shape and dtype (float32/bfloat16/float16), hidden <= 16384.
      weight: [hidden], same dtype as x.
      eps: > 0.
    Returns:
      (normed, new_residual): [..., hidden] each, in x.dtype.
    Raises:
      ValueError: bad dtype or shapes, hidden > 16384, eps <= 0.
      RuntimeError: jax_triton/triton missing or no GPU (the message says which).
    """
    if jnp.dtype(x.dtype) not in _api.FLOAT_DTYPES or x.ndim < 1:
        raise ValueError(f"x dtype={jnp.dtype(x.dtype).name} shape={x.shape} unsupported; use a float "
                         "array with a hidden axis")
    hidden = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual shape={residual.shape} dtype={jnp.dtype(residual.dtype).name} must "
                         f"equal x shape={x.shape} dtype={jnp.dtype(x.dtype).name}")
    if weight.shape != (hidden,) or weight.dtype != x.dtype:
        raise ValueError(f"weight shape={weight.shape} dtype={jnp.dtype(weight.dtype).name} must be "
                         f"({hidden},) {jnp.dtype(x.dtype).name}")
    if not 0 < hidden <= MAX_BLOCK:
        raise ValueError(f"hidden={hidden} unsupported; one row per program needs 0 < hidden <= {MAX_BLOCK}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps={eps} must be a Python number > 0")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"pallas_kernels.triton.rms_norm_residual: {reason}")
    import jax_triton

    rows = math.prod(x.shape[:-1])
    block = 1 << (hidden - 1).bit_length()
    out = jax.ShapeDtypeStruct((rows, hidden), x.dtype)
    normed, new_residual = jax_triton.triton_call(
        x.reshape(rows, hidden), residual.reshape(rows, hidden), weight,
        kernel=_kernel(),
        out_shape=[out, out],
        grid=(rows,),
        num_warps=min(16, max(1, block // 256)),
        num_stages=1,
        n_cols=hidden, eps=float(eps), BLOCK=block,
    )
    return normed.reshape(x.shape), new_residual.reshape(x.shape)
