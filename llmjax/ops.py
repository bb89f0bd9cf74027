"""Attention and normalization, dispatched on `ModelConfig.attention_impl` / `norm_impl`.

B batch, T query length, S key length, N heads, K kv heads, G = N // K, H head dim.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from pallas_kernels.cross_entropy import api as pallas_ce
import pallas_kernels.norms as pallas_norms
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention.config import cudnn_flash_head_dim_ok

ATTENTION_IMPLS = ("xla", "cudnn", "pallas", "auto")
# XLA's GPU simplifier turns a vector x matrix dot whose operands hold fewer elements than this
# into multiply + reduce (IsMatrixMultiplicationTooSmallForRewriting in its strength reduction).
XLA_GEMV_TO_REDUCE_BELOW = 10_000_000


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _hopper() -> bool:
    """Whether the first device is a Hopper (or newer) GPU; False off a GPU."""
    capability = getattr(jax.devices()[0], "compute_capability", None) if _on_gpu() else None
    return capability is not None and float(capability) >= 9.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    """A weight stored as int8 `values` times `scale` (size 1 on the axes a matmul contracts;
    `llmjax.decode.quantize` makes them). `w[...]` dequantizes; `dense` instead multiplies the
    matmul's output by the scale, so the GEMM reads the int8 bytes and converts them on the fly."""

    values: jax.Array
    scale: jax.Array

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise IndexError(f"Int8Weight supports only w[...], got index {index!r}")
        return self.values.astype(self.scale.dtype) * self.scale

    @property
    def shape(self):
        return self.values.shape

    @property
    def T(self):  # noqa: N802 (as jax.Array.T)
        return Int8Weight(self.values.T, self.scale.T)


def weight(variable, dtype):
    """A weight variable's value for a matmul in `dtype`: cast, except an Int8Weight, which stays
    int8 (its scale cast) for `dense` to scale after the matmul. Other stored forms (e.g. QLoRA's
    NF4) dequantize through `variable[...]`."""
    value = variable.get_value()
    if isinstance(value, Int8Weight):
        return Int8Weight(value.values, value.scale.astype(dtype))
    return variable[...].astype(dtype)


def dense(x, w, n_contract: int = 1, out_dtype=None):
    """x [..., *in] times a weight w [*in, *out] -> [..., *out], contracting the last
    `n_contract` axes of x with the first of w (a projection, in the weight's own layout).
    `out_dtype`: the result's dtype (default x's; e.g. fp32 logits, accumulated in fp32 alike).

    An Int8Weight w is converted inside the matmul and its per-channel scale applied to the
    output: (x @ q) * s equals x @ (q * s) and reads 1 byte a weight.
    A single row of x on a GPU (a batch-1 decode step) runs as a [2, in] x [in, out] matmul
    with a zero second row when XLA would otherwise rewrite the vector x matrix product into
    multiply + reduce kernels (operands under 10M elements), which read the weight at about a
    third of the bandwidth of its GEMMs (benchmarks/NOTES.md, 2026-12-04).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if isinstance(w, Int8Weight):
        y = dense(x, w.values.astype(x.dtype), n_contract, jnp.float32)
        return (y * w.scale.reshape(w.shape[n_contract:]).astype(jnp.float32)).astype(out_dtype)
    lead = x.shape[:x.ndim - n_contract]
    if not _on_gpu() or math.prod(lead) != 1 or x.size + w.size >= XLA_GEMV_TO_REDUCE_BELOW:
        return jnp.tensordot(x, w, n_contract, preferred_element_type=out_dtype)
    row = x.reshape(1, -1)
    rows = jnp.concatenate([row, jnp.zeros_like(row)])
    y = jnp.matmul(rows, w.reshape(row.shape[1], -1), preferred_element_type=out_dtype)
    return y[0].reshape(*lead, *w.shape[n_contract:])


def attention_xla(q, k, v, *, causal: bool, mask=None, scale: float | None = None):
    """Grouped-query attention in plain jnp (softmax in fp32).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N.
      causal: query i sees keys j <= i + (S - T) (the last T positions of the keys).
      mask: optional boolean [B, T, S] (True = attend), combined with `causal`.
    Returns:
      [B, T, N, H], dtype of q.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = h ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    allowed = jnp.ones((t, s), bool)
    if causal:
        allowed = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    allowed = allowed[None] if mask is None else allowed[None] & mask
    # A large finite negative (not -inf) keeps fully masked rows NaN-free.
    scores = jnp.where(allowed[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def auto_attention_impl(dtype, head_dim: int, *, has_mask: bool, on_gpu: bool, hopper: bool | None = None) -> str:
    """What impl="auto" runs: cuDNN on a GPU for half precision, no explicit mask and a head
    dim cuDNN's flash kernel takes (a multiple of 8, at most 256 on Hopper, 128 before); XLA
    otherwise."""
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if not on_gpu or not half or has_mask:
        return "xla"
    return "cudnn" if cudnn_flash_head_dim_ok(head_dim, hopper=_hopper() if hopper is None else hopper) else "xla"


def attention(q, k, v, *, causal: bool, impl: str = "auto", mask=None):
    """Scaled dot-product attention, [B, T, N, H] x [B, S, K, H] -> [B, T, N, H].

    `impl`: `xla` (plain jnp), `cudnn` (`jax.nn.dot_product_attention`, GPU, fp16/bf16),
    `pallas` (`pallas_kernels.flash_attention` with backend="auto": our Mosaic or Triton kernels
    on a GPU, its fp32 reference on a CPU), `auto` (`auto_attention_impl`: cudnn where it applies, else
    xla; cuDNN is the fastest in benchmarks/results/flash_attention_*.json).

    Raises:
      ValueError: unknown impl, or cudnn / pallas given an explicit mask (or cudnn off a GPU).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl={impl!r} unknown; use one of {ATTENTION_IMPLS}")
    if impl == "auto":
        impl = auto_attention_impl(q.dtype, q.shape[-1], has_mask=mask is not None, on_gpu=_on_gpu())
    if impl in ("cudnn", "pallas") and mask is not None:
        raise ValueError(f"attention impl={impl!r} takes no explicit mask; use 'xla' or 'auto'")
    if impl == "cudnn":
        if not _on_gpu():
            raise ValueError("attention impl='cudnn' needs a GPU; use 'xla', 'pallas' or 'auto'")
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if impl == "pallas":
        return flash_attention(q, k, v, causal=causal)
    return attention_xla(q, k, v, causal=causal, mask=mask)


def layer_norm(x, weight, bias, *, eps: float, impl: str = "xla"):
    """LayerNorm over the last axis with fp32 statistics; returns x's dtype.

    `impl`: `xla` (jnp, fused by XLA) or `pallas` (pallas_kernels.norms; on a CPU it
    falls back to its reference with a logged warning).
    """
    if impl == "pallas":
        return pallas_norms.layer_norm(x, weight.astype(x.dtype), bias.astype(x.dtype), eps=eps)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * weight + bias
    return y.astype(x.dtype)


def rms_norm(x, weight, *, eps: float, impl: str = "xla"):
    """RMSNorm over the last axis with fp32 statistics; returns x's dtype. `impl` as layer_norm."""
    if impl == "pallas":
        return pallas_norms.rms_norm(x, weight.astype(x.dtype), eps=eps)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * weight
    return y.astype(x.dtype)


def add_norm(x, residual, weight, bias=None, *, eps: float, impl: str = "xla"):
    """The pre-norm block's residual add and the norm after it: (norm(x + residual), x + residual),
    LayerNorm with a bias, RMSNorm without; x and residual of one dtype. The returned sum is
    rounded to x's dtype. `impl`: `xla`, or `pallas` (one kernel reads x and residual once and
    writes both outputs, where XLA may write the sum and read it back). Both may normalize the
    sum before its rounding (pallas always; XLA when it fuses the add into the norm, under its
    default excess precision), so normed can differ from the norm of the rounded sum in the
    last bits.
    """
    if impl == "pallas":
        dt = x.dtype
        if bias is None:
            return pallas_norms.rms_norm_residual(x, residual, weight.astype(dt), eps=eps)
        return pallas_norms.layer_norm_residual(x, residual, weight.astype(dt), bias.astype(dt), eps=eps)
    total = x + residual
    if bias is None:
        return rms_norm(total, weight, eps=eps), total
    return layer_norm(total, weight, bias, eps=eps), total


def lm_loss(hidden, vocab_weight, targets, *, impl: str = "xla"):
    """Mean next-token cross-entropy of hidden [B, T, D] against targets [B, T].

    vocab_weight: [V, D]. `xla` materializes fp32 logits [B, T, V]; `fused` is
    pallas_kernels.cross_entropy, which never holds all the logits at once.
    """
    if impl == "fused":
        d = hidden.shape[-1]
        return pallas_ce.cross_entropy(hidden.reshape(-1, d), vocab_weight.astype(hidden.dtype),
                                       targets.reshape(-1))
    logits = jnp.einsum("btd,vd->btv", hidden, vocab_weight.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
