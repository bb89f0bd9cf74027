"""Cross-entropy over hidden @ vocab_weight.T without the full [tokens, vocab] logits, in plain JAX.

The tokens are split into n_chunks chunks; each step of a lax.scan computes one chunk's full-vocabulary
logits [chunk, vocab] in the inputs' dtype (bf16 inputs: fp32 accumulation, rounded to bf16 once;
everything after it in fp32), its log-sum-exp, loss
and, when asked, the gradients: dlogits = coef * (p * (1 + 2 z_loss lse) - onehot(label)) with
p = exp(logits - lse), then dhidden_chunk = dlogits @ W and dW += dlogits.T @ hidden_chunk (fp32
carry). That is three matmuls, as many as the materializing version, because a scalar loss lets the
gradient be formed in the same pass as the loss (Liger-Kernel's fused linear cross-entropy does this).
Peak extra memory: one chunk's logits and dlogits, plus the fp32 dW accumulator [vocab, d_model]
(and, unless XLA fuses the accumulate into the matmul as cuBLAS does with beta = 1, a second
[vocab, d_model] fp32 buffer for each chunk's contribution; on CPU it does not).

The matmuls are XLA's (cuBLAS). The per-chunk softmax work between them runs either as XLA's
fusions (a max, a sum of exp, then the gradient pass: three reads of the logits) or as the Pallas
kernel of triton_chunk.py (an online log-sum-exp pass and the gradient pass: two reads).

Chunks are strided (token t goes to chunk t % n_chunks), so when tokens are sharded over devices every
chunk keeps the same sharding and each scan step runs on all devices (with the XLA fusions: the
Pallas kernel has no partitioning rule, so api.py does not pick it under such a mesh).
"""
import functools

import jax.numpy as jnp
from jax import lax

from pallas_kernels.cross_entropy import triton_chunk


# fp16 chunk gradients are formed at this multiple of the largest token weight (|dlogits| <= about
# 1 + 2 z_loss lse before it, so far below fp16's 65504 after it).
FP16_GRAD_SCALE = 1024.0


def _softmax_stats_and_grad_xla(logits, labels, coef, *, z_loss, with_grads):
    """The math of triton_chunk.softmax_stats_and_grad in XLA fusions (same arguments, same results)."""
    x = logits.astype(jnp.float32)  # [chunk, vocab]
    m = jnp.max(x, axis=1)
    lse = m + jnp.log(jnp.sum(jnp.exp(x - m[:, None]), axis=1))  # [chunk]
    is_label = lax.broadcasted_iota(jnp.int32, x.shape, 1) == labels[:, None]
    label_logit = jnp.sum(jnp.where(is_label, x, 0.0), axis=1)
    if not with_grads:
        return lse, label_logit, None
    scale = coef * (1.0 + 2.0 * z_loss * lse)  # d(lse + z lse^2)/d lse, times the token's weight
    dlogits = jnp.exp(x - lse[:, None]) * scale[:, None] - jnp.where(is_label, coef[:, None], 0.0)
    return lse, label_logit, dlogits.astype(logits.dtype)


def _chunk(hidden, labels, coef, weight, *, ignore_index, z_loss, with_grads, precision, interpret):
    """One chunk. hidden: [chunk, d_model]; labels: [chunk] int; coef: [chunk] fp32, the weight of
    each token's loss in the total (0 for ignored and padding tokens); weight: [vocab, d_model].
    interpret: None for XLA's fusions after the logits matmul, else the Pallas kernel of
    triton_chunk.py (in interpret mode if True).
    Returns loss [chunk] fp32, and with_grads: dhidden [chunk, d_model] in hidden.dtype and
    dweight [vocab, d_model] fp32 (both accumulated in fp32 inside the matmuls).
    """
    # 16-bit inputs get 16-bit logits (fp32 accumulation inside the matmul, one rounding at the
    # end, as under torch autocast): the passes over [chunk, vocab] read half the bytes (GPT-2
    # 124M on an H200: ~13 GB a step less). The math after it is fp32.
    logits = lax.dot_general(hidden, weight, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=hidden.dtype)  # [chunk, vocab]
    valid = labels != ignore_index
    # fp16 dlogits underflow: p * coef is ~1e-9 for a 50k vocabulary under "mean" (coef = 1 /
    # tokens), below fp16's smallest subnormal. Its gradient is formed at coef * grad_scale and the
    # fp32 matmul results divided by it (loss scaling, per chunk).
    grad_scale = None
    if coef is None:
        coef = jnp.zeros(labels.shape, jnp.float32)
    elif hidden.dtype == jnp.float16:
        largest = jnp.max(jnp.abs(coef))
        grad_scale = jnp.where(largest > 0, FP16_GRAD_SCALE / largest, 1.0)
        coef = coef * grad_scale
    stats = (_softmax_stats_and_grad_xla if interpret is None
             else functools.partial(triton_chunk.softmax_stats_and_grad, interpret=interpret))
    lse, label_logit, dlogits = stats(logits, jnp.where(valid, labels, -1), coef, z_loss=z_loss,
                                      with_grads=with_grads)
    loss = jnp.where(valid, lse - label_logit + z_loss * jnp.square(lse), 0.0)
    if not with_grads:
        return loss
    dhidden = jnp.dot(dlogits, weight, precision=precision, preferred_element_type=jnp.float32)
    dweight = lax.dot_general(dlogits, hidden, (((0,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)  # [vocab, d_model]
    if grad_scale is not None:
        dhidden, dweight = dhidden / grad_scale, dweight / grad_scale
    return loss, dhidden.astype(hidden.dtype), dweight  # dhidden [chunk, d_model]: a stacked scan output, kept small


def _split(a, n_chunks, fill):
    """[tokens, ...] -> [n_chunks, chunk, ...], strided (token t -> chunk t % n_chunks), padded with fill."""
    tokens = a.shape[0]
    chunk = -(-tokens // n_chunks)
    a = jnp.pad(a, [(0, chunk * n_chunks - tokens)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return jnp.swapaxes(a.reshape(chunk, n_chunks, *a.shape[1:]), 0, 1)


def _merge(a, tokens):
    """Inverse of _split: [n_chunks, chunk, ...] -> [tokens, ...]."""
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape(-1, *a.shape[2:])[:tokens]


def chunked_loss(hidden, weight, labels, coef, *, n_chunks, ignore_index, z_loss, with_grads, interpret=None):
    """Per-token losses (and gradients of sum(coef * loss)) over token chunks.

    Args:
      hidden: [tokens, d_model]; weight: [vocab, d_model], same dtype; labels: [tokens] int.
      coef: [tokens] fp32 weights of the per-token losses in the differentiated total; None when
        not with_grads.
      n_chunks: number of token chunks (scan steps).
      interpret: as in _chunk (None: XLA's fusions for the softmax; False / True: the Pallas kernel).
    Returns:
      loss [tokens] fp32; with_grads also dhidden [tokens, d_model] (hidden.dtype) and
      dweight [vocab, d_model] fp32.
    """
    tokens = hidden.shape[0]
    precision = lax.Precision.HIGHEST if hidden.dtype == jnp.float32 else lax.Precision.DEFAULT
    options = dict(ignore_index=ignore_index, z_loss=z_loss, precision=precision, interpret=interpret)
    xs = (_split(hidden, n_chunks, 0), _split(labels, n_chunks, ignore_index))
    if not with_grads:
        loss = lax.map(lambda c: _chunk(*c, None, weight, with_grads=False, **options), xs)
        return _merge(loss, tokens)
    xs = (*xs, _split(coef, n_chunks, 0.0))

    def step(dweight, c):
        loss, dhidden, dweight_chunk = _chunk(*c, weight, with_grads=True, **options)
        return dweight + dweight_chunk, (loss, dhidden)

    dweight, (loss, dhidden) = lax.scan(step, jnp.zeros(weight.shape, jnp.float32), xs)
    return _merge(loss, tokens), _merge(dhidden, tokens), dweight
