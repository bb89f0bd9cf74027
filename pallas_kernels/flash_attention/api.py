"""flash_attention: input checks, backend choice and the custom_vjp around the Pallas kernels.

B batch, T query length, S key length, N query heads, K kv heads, H head dim.
"""
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.flash_attention import (config, mosaic_bwd, mosaic_fwd, reference, triton_bwd,
                                            triton_fwd)

BACKENDS = ("auto", "reference", "triton", "mosaic")
KERNEL_HEAD_DIMS = (64, 128)
DTYPES = _api.FLOAT_DTYPES

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def flash_attention(q, k, v, *, causal=False, scale=None, segment_ids=None, backend="auto",
                    interpret=False, blocks=None):
    """Scaled dot-product attention softmax(scale * q k^T) v without materializing [T, S].

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], the layout of `jax.nn.dot_product_attention`.
        K must divide N (grouped-query attention: query head n reads kv head n // (N // K)).
        One dtype for all three: float32, bfloat16 or float16.
      causal: query t sees keys s <= t; needs T == S.
      scale: logit scale (a Python number), default H ** -0.5.
      segment_ids: optional int [B, T] for packed sequences (needs T == S): a token attends only
        to tokens with the same id (and, if causal, not after it).
      backend: "auto" (on an sm_90 GPU the Mosaic kernels where they serve the call: bf16/fp16
        and no segment_ids, else the Triton kernels; on other GPUs and in interpret mode the
        Triton kernels; on CPU without interpret the reference; head dims without a kernel
        fall back to the reference, logged once), "reference" (plain jnp, fp32), "triton"
        (Pallas Triton kernels, H in {64, 128}), "mosaic" (Pallas Mosaic GPU forward and
        backward for Hopper, bf16/fp16, no segment_ids). A named backend that cannot serve the
        call raises.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      blocks: `config.BlockSizes` for the kernels; default `config.tuned_blocks` (the autotune table, else the heuristic).
    Returns:
      [B, T, N, H] in q's dtype; differentiable in q, k, v (Pallas backward kernels).
    Raises:
      ValueError: bad rank, dtype, shapes, head_dim, scale, backend, or a named backend that
        cannot run here; the message names the offending value.
    """
    _validate(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids, backend=backend,
              interpret=interpret, blocks=blocks)
    b, t, n, h = q.shape
    scale = h ** -0.5 if scale is None else float(scale)
    chosen = _choose_backend(backend, head_dim=h, dtype=q.dtype, segmented=segment_ids is not None,
                             interpret=interpret)
    if chosen == "reference":
        out = reference.attention_reference(q, k, v, causal=causal, scale=scale,
                                            segment_ids=segment_ids)
        return out.astype(q.dtype)
    if blocks is None:
        blocks = config.tuned_blocks(t, k.shape[1], h, causal, q.dtype)
    if chosen == "mosaic":  # before any kernel is traced, not first in the backward
        mosaic_fwd.check_smem(blocks.mosaic, h, q.dtype)
        mosaic_bwd.check_smem(blocks.mosaic_bwd, h, q.dtype)
    static = _Static(forward=chosen, causal=bool(causal), scale=scale,
                     blocks=config.fit_to_shape(blocks, t, k.shape[1]), interpret=bool(interpret))
    return _kernel_attention(q, k, v, segment_ids, static)


def _validate(q, k, v, *, causal, scale, segment_ids, backend, interpret, blocks):
    """Raise ValueError naming the first bad value; runs before any kernel is traced."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be rank 4 [batch, seq, heads, head_dim]; "
                             f"got {name}.shape={getattr(x, 'shape', None)}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype from {[d.name for d in DTYPES]}; got "
                         f"q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k.shape={k.shape}, v.shape={v.shape}")
    (b, t, n, h), (bk, s, kv_heads, hk) = q.shape, k.shape
    if b != bk:
        raise ValueError(f"batch differs: q.shape[0]={b}, k.shape[0]={bk}")
    if h != hk:
        raise ValueError(f"head_dim differs: q has head_dim={h}, k and v have head_dim={hk}")
    if min(t, s, n, kv_heads, h) < 1:
        raise ValueError(f"empty dimension: q.shape={q.shape}, k.shape={k.shape}")
    if n % kv_heads:
        raise ValueError(f"heads={n} is not divisible by kv_heads={kv_heads}; "
                         "kv_heads must divide heads")
    if causal and t != s:
        raise ValueError(f"causal=True needs seq_q == seq_kv; got seq_q={t}, seq_kv={s}")
    if segment_ids is not None:
        shape, dtype = getattr(segment_ids, "shape", None), getattr(segment_ids, "dtype", None)
        if shape != (b, t) or t != s or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"segment_ids must be an int array [batch, seq] = {(b, t)} with "
                             f"seq_q == seq_kv; got shape={shape}, dtype={dtype}, seq_kv={s}")
    if scale is not None:
        try:
            ok = math.isfinite(float(scale)) and float(scale) > 0
        except (TypeError, jax.errors.ConcretizationTypeError):
            ok = False
        if not ok:
            raise ValueError(f"scale={scale!r} must be a positive finite Python number (static)")
    _api.check_backend(backend, BACKENDS)
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be a bool")
    if blocks is not None and not isinstance(blocks, config.BlockSizes):
        raise ValueError(f"blocks={blocks!r} must be a config.BlockSizes or None")


_platform = _api.platform  # a module name the tests can patch


_is_hopper = _api.targets_hopper  # a module name the tests can patch


def _choose_backend(backend: str, *, head_dim: int, dtype, segmented: bool, interpret: bool) -> str:
    """Resolve "auto"; raise if a named kernel backend cannot serve this call."""
    platform = _platform()
    runnable = platform == "gpu" or interpret
    if backend == "auto":
        if head_dim not in KERNEL_HEAD_DIMS:
            _api.warn_once(_log, _warned, f"flash_attention: head_dim={head_dim} has no kernel "
                           f"(supported: {KERNEL_HEAD_DIMS}); using the reference backend")
            return "reference"
        if not runnable:
            return "reference"
        # Hopper: the Mosaic forward beat the Triton one at every benchmarked shape on our H100
        # (benchmarks/NOTES.md, benchmarks/results/flash_attention_*.json).
        mosaic_serves = jnp.dtype(dtype) in mosaic_fwd.DTYPES and not segmented
        return "mosaic" if mosaic_serves and platform == "gpu" and _is_hopper() else "triton"
    if backend == "reference":
        return backend
    if head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} unsupported by backend={backend!r}; use one of "
                         f"{KERNEL_HEAD_DIMS}, or backend='reference'")
    if not runnable:
        raise ValueError(f"backend={backend!r} needs a GPU or interpret=True; "
                         f"jax's default backend here is {platform!r}")
    if backend == "mosaic":
        if jnp.dtype(dtype) not in mosaic_fwd.DTYPES:
            raise ValueError(f"dtype={jnp.dtype(dtype).name} unsupported by backend='mosaic'; use "
                             f"bfloat16 or float16, or backend='triton'")
        if segmented:
            raise ValueError("segment_ids unsupported by backend='mosaic'; use backend='triton'")
        if not interpret and not _is_hopper():
            raise ValueError(f"backend='mosaic' needs an sm_90 GPU (Hopper) or interpret=True; got "
                             f"{jax.devices()[0].device_kind!r}")
    return backend


@dataclasses.dataclass(frozen=True)
class _Static:
    """The non-differentiable options of one call: hashable, so custom_vjp can hold them."""

    forward: str  # the kernels of both passes: "triton" or "mosaic"
    causal: bool
    scale: float
    blocks: config.BlockSizes
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(q, k, v, segment_ids, static: _Static):
    out, _ = _forward(q, k, v, segment_ids, static)
    return out


def _forward(q, k, v, segment_ids, static: _Static):
    if static.forward == "mosaic":
        out, lse2 = mosaic_fwd.flash_forward(q, k, v, scale=static.scale, causal=static.causal,
                                             blocks=static.blocks.mosaic,
                                             interpret=static.interpret)
    else:
        out, lse2 = triton_fwd.flash_forward(q, k, v, segment_ids, scale=static.scale,
                                             causal=static.causal, blocks=static.blocks,
                                             interpret=static.interpret)
    return out, (q, k, v, segment_ids, out, lse2)  # residuals: inputs, output, base-2 lse


def _backward(static: _Static, residuals, dout):
    q, k, v, segment_ids, out, lse2 = residuals
    if static.forward == "mosaic":
        dq, dk, dv = mosaic_bwd.flash_backward(q, k, v, out, lse2, dout, scale=static.scale,
                                               causal=static.causal,
                                               blocks=static.blocks.mosaic_bwd,
                                               interpret=static.interpret)
        return dq, dk, dv, None
    dq, dk, dv = triton_bwd.flash_backward(q, k, v, segment_ids, out, lse2, dout,
                                           scale=static.scale, causal=static.causal,
                                           blocks=static.blocks, interpret=static.interpret)
    return dq, dk, dv, None  # segment_ids: integer, no cotangent


_kernel_attention.defvjp(_forward, _backward)
