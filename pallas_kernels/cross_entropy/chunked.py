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

Plain JAX, no Pallas: the time is in the matmuls (XLA calls cuBLAS); the per-chunk elementwise work
is two reductions and one fused elementwise pass, which XLA fuses already. A Pallas kernel would have
to match cuBLAS on the matmuls to gain anything.

Chunks are strided (token t goes to chunk t % n_chunks), so when tokens are sharded over devices every
chunk keeps the same sharding and each scan step runs on all devices.
"""
import jax.numpy as jnp
from jax import lax


def _chunk(hidden, labels, coef, weight, *, ignore_index, z_loss, with_grads, precision):
    """One chunk. hidden: [chunk, d_model]; labels: [chunk] int; coef: [chunk] fp32, the weight of
    each token's loss in the total (0 for ignored and padding tokens); weight: [vocab, d_model].
    Returns loss [chunk] fp32, and with_grads: dhidden [chunk, d_model] in hidden.dtype and
    dweight [vocab, d_model] fp32 (both accumulated in fp32 inside the matmuls).
    """
    # 16-bit inputs get 16-bit logits (fp32 accumulation inside the matmul, one rounding at the
    # end, as under torch autocast): the three passes over [chunk, vocab] below then read half
    # the bytes (GPT-2 124M on an H200: ~13 GB a step less). The math after it is fp32.
    logits = lax.dot_general(hidden, weight, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=hidden.dtype).astype(jnp.float32)  # [chunk, vocab]
    m = jnp.max(logits, axis=1)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[:, None]), axis=1))  # [chunk]
    valid = labels != ignore_index
    is_label = lax.broadcasted_iota(jnp.int32, logits.shape, 1) == jnp.where(valid, labels, 0)[:, None]
    label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
    loss = jnp.where(valid, lse - label_logit + z_loss * jnp.square(lse), 0.0)
    if not with_grads:
        return loss
    scale = coef * (1.0 + 2.0 * z_loss * lse)  # d(lse + z lse^2)/d lse, times the token's weight
    dlogits = jnp.exp(logits - lse[:, None]) * scale[:, None] - jnp.where(is_label, coef[:, None], 0.0)
    dlogits = dlogits.astype(hidden.dtype)  # [chunk, vocab], matmul dtype
    dhidden = jnp.dot(dlogits, weight, precision=precision, preferred_element_type=jnp.float32)
    dhidden = dhidden.astype(hidden.dtype)  # [chunk, d_model]; a stacked scan output, so kept small
    dweight = lax.dot_general(dlogits, hidden, (((0,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=jnp.float32)  # [vocab, d_model]
    return loss, dhidden, dweight


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


def chunked_loss(hidden, weight, labels, coef, *, n_chunks, ignore_index, z_loss, with_grads):
    """Per-token losses (and gradients of sum(coef * loss)) over token chunks.

    Args:
      hidden: [tokens, d_model]; weight: [vocab, d_model], same dtype; labels: [tokens] int.
      coef: [tokens] fp32 weights of the per-token losses in the differentiated total; None when
        not with_grads.
      n_chunks: number of token chunks (scan steps).
    Returns:
      loss [tokens] fp32; with_grads also dhidden [tokens, d_model] (hidden.dtype) and
      dweight [vocab, d_model] fp32.
    """
    tokens = hidden.shape[0]
    precision = lax.Precision.HIGHEST if hidden.dtype == jnp.float32 else lax.Precision.DEFAULT
    options = dict(ignore_index=ignore_index, z_loss=z_loss, precision=precision)
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
