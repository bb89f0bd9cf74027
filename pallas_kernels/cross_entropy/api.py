"""Public fused cross-entropy over the vocabulary projection: validation, chunk choice, custom_vjp.

With reduction "mean" or "sum" the loss is a scalar, so the forward rule computes the gradients in the
same pass (chunked.py) and the backward rule only scales them by the incoming cotangent. With
reduction "none" the backward recomputes the logits chunk by chunk with the per-token cotangents.
"""
import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _api
from pallas_kernels.cross_entropy import chunked, reference

BACKENDS = ("auto", "triton", "chunked", "reference")
REDUCTIONS = ("mean", "sum", "none")
# Default chunking keeps one chunk's logits, counted at 4 bytes each (what the fp32 math over them
# costs), under this many bytes (8 and 16 chunks at 16k tokens and vocab 50k to 128k). Smaller
# chunks save memory but re-read the fp32 dW accumulator more often.
LOGITS_CHUNK_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class _Options:
    n_chunks: int
    ignore_index: int
    z_loss: float
    reduction: str
    dtype: str  # of hidden and vocab_weight (validated equal), for the gradients
    interpret: bool | None  # None: XLA's softmax fusions; else the Pallas chunk kernel (interpreted if True)


def _coefficients(labels, opts):
    """Weight of each token's loss in the scalar total: 1/n_valid ("mean", 0 tokens -> 0) or 1 ("sum")."""
    valid = (labels != opts.ignore_index).astype(jnp.float32)
    if opts.reduction == "sum":
        return valid
    return valid / jnp.maximum(jnp.sum(valid), 1.0)


def _loss_options(opts):
    return dict(n_chunks=opts.n_chunks, ignore_index=opts.ignore_index, z_loss=opts.z_loss,
                interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_loss(hidden, weight, labels, opts):
    """hidden: [tokens, d_model]; weight: [vocab, d_model]; labels: [tokens]. Scalar or [tokens] fp32."""
    loss = chunked.chunked_loss(hidden, weight, labels, None, with_grads=False, **_loss_options(opts))
    return loss if opts.reduction == "none" else jnp.sum(loss * _coefficients(labels, opts))


def _fused_loss_fwd(hidden, weight, labels, opts):
    if opts.reduction == "none":
        loss = chunked.chunked_loss(hidden, weight, labels, None, with_grads=False, **_loss_options(opts))
        return loss, (hidden, weight, labels)
    coef = _coefficients(labels, opts)
    loss, dhidden, dweight = chunked.chunked_loss(hidden, weight, labels, coef, with_grads=True,
                                                  **_loss_options(opts))
    return jnp.sum(loss * coef), (dhidden, dweight)


def _fused_loss_bwd(opts, res, cotangent):
    if opts.reduction == "none":
        hidden, weight, labels = res
        coef = jnp.where(labels != opts.ignore_index, cotangent, 0.0)
        _, dhidden, dweight = chunked.chunked_loss(hidden, weight, labels, coef, with_grads=True,
                                                   **_loss_options(opts))
        return dhidden.astype(hidden.dtype), dweight.astype(weight.dtype), None
    dhidden, dweight = res
    return (cotangent * dhidden).astype(opts.dtype), (cotangent * dweight).astype(opts.dtype), None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def default_n_chunks(tokens: int, vocab: int) -> int:
    """Token chunks so that one chunk's logits at 4 bytes each stay under LOGITS_CHUNK_BYTES (a power of 2, so
    power-of-2 token counts split without padding)."""
    return min(pl.next_power_of_2(max(1, -(-tokens * vocab * 4 // LOGITS_CHUNK_BYTES))), tokens)


def _validate(hidden, vocab_weight, labels, ignore_index, z_loss, chunk_size, reduction, backend):
    _api.check_float_dtype("hidden", hidden)
    _api.check_float_dtype("vocab_weight", vocab_weight)
    if hidden.ndim < 1 or vocab_weight.ndim != 2 or vocab_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"vocab_weight shape={vocab_weight.shape} must be [vocab, d_model] with d_model "
                         f"= hidden.shape[-1] (hidden shape={hidden.shape})")
    if vocab_weight.dtype != hidden.dtype:
        raise ValueError(f"vocab_weight dtype={jnp.dtype(vocab_weight.dtype).name} must equal hidden dtype="
                         f"{jnp.dtype(hidden.dtype).name}; cast one of them")
    if labels.shape != hidden.shape[:-1] or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels shape={labels.shape} dtype={jnp.dtype(labels.dtype).name} must be integer "
                         f"with shape hidden.shape[:-1]={hidden.shape[:-1]}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index={ignore_index!r} must be a Python int")
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real) or not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss={z_loss} must be a finite Python number >= 0")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int or None")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} unknown; use one of {REDUCTIONS}")
    _api.check_backend(backend, BACKENDS)


def _partitioned() -> bool:
    """Whether this trace runs under a mesh of several devices with axes XLA partitions (a
    pallas_call has no partitioning rule: its operands would be gathered whole on every device,
    where the chunked XLA path keeps each device's tokens local)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(size > 1 and name not in mesh.manual_axes
                                  for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def cross_entropy(hidden, vocab_weight, labels, *, ignore_index=-100, z_loss=0.0, chunk_size=None,
                  reduction="mean", backend="auto", interpret=False):
    """Cross-entropy of logits = hidden @ vocab_weight.T without materializing all the logits.

    loss_i = logsumexp(logits_i) - logits_i[label_i] + z_loss * logsumexp(logits_i)^2.

    Args:
      hidden: [..., d_model], float32/bfloat16/float16.
      vocab_weight: [vocab, d_model] (the tied-embedding layout), same dtype as hidden.
      labels: [...] integer, in [0, vocab) or ignore_index (other values are not checked; their loss
        is unspecified).
      ignore_index: label value excluded from the loss and from the mean's denominator.
      z_loss: >= 0, weight of the squared log-normalizer term.
      chunk_size: at most this many tokens per chunk; None picks a power-of-2 number of chunks
        of at most 128M logits each (512 MiB in fp32).
      reduction: "mean" over non-ignored tokens (0 if there are none), "sum", or "none".
      backend: "chunked" (chunked.py: chunks of cuBLAS matmuls and XLA fusions), "triton" (the
        same chunks with each chunk's softmax and logit gradient in one Pallas kernel,
        triton_chunk.py; a GPU, or interpret=True), "auto" (triton on a GPU or with interpret=True,
        except under a mesh that partitions the call: chunked), or "reference" (materializes
        the logits).
      interpret: run the Pallas kernel in interpret mode (CPU tests).
    Returns:
      fp32 scalar ("mean", "sum") or [...] per-token losses ("none", 0 at ignored tokens).
    Raises:
      ValueError: bad dtype, shape mismatch between hidden, vocab_weight and labels, z_loss < 0,
        chunk_size < 1, unknown reduction or backend, "triton" without a GPU or interpret=True.
    """
    _validate(hidden, vocab_weight, labels, ignore_index, z_loss, chunk_size, reduction, backend)
    # "triton" raises without a GPU or interpret; "auto" takes the kernel where it runs, except
    # under a partitioning mesh (see _partitioned), and the chunked XLA path otherwise.
    runs = _api.triton_or_reference("triton" if backend == "triton" else "auto", interpret,
                                    lambda reason: None) == "triton"
    kernel = backend == "triton" or (backend == "auto" and runs and not _partitioned())
    if backend == "reference":
        return reference.cross_entropy(hidden, vocab_weight, labels, ignore_index=ignore_index,
                                       z_loss=z_loss, reduction=reduction)
    lead, d_model = hidden.shape[:-1], hidden.shape[-1]
    tokens = math.prod(lead)
    if tokens == 0:
        return reference.cross_entropy(hidden, vocab_weight, labels, ignore_index=ignore_index,
                                       z_loss=z_loss, reduction=reduction)
    if chunk_size is None:
        n_chunks = default_n_chunks(tokens, vocab_weight.shape[0])
    else:
        n_chunks = -(-tokens // min(chunk_size, tokens))
    opts = _Options(n_chunks=n_chunks, ignore_index=ignore_index, z_loss=float(z_loss),
                    reduction=reduction, dtype=jnp.dtype(hidden.dtype).name,
                    interpret=bool(interpret) if kernel else None)
    loss = _fused_loss(hidden.reshape(tokens, d_model), vocab_weight, labels.reshape(tokens), opts)
    return loss.reshape(lead) if reduction == "none" else loss
