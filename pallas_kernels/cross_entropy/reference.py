"""Cross-entropy over a vocabulary projection, materializing the [tokens, vocab] logits in fp32.

The definition of correct for chunked.py, and the XLA peer in bench.py (called with bf16 inputs it is
the usual bf16 matmul with fp32 accumulation followed by an fp32 log-softmax).
loss_i = lse_i - logit_i[label_i] + z_loss * lse_i^2 (the z-loss of PaLM, Chowdhery et al. 2022, 5),
over tokens whose label is not ignore_index.
"""
import jax
import jax.numpy as jnp


def cross_entropy(hidden, vocab_weight, labels, *, ignore_index=-100, z_loss=0.0, reduction="mean"):
    """hidden: [..., d_model]; vocab_weight: [vocab, d_model]; labels: [...] int.

    Returns a scalar (reduction "mean" over non-ignored tokens, 0 when there are none, or "sum") or
    per-token losses [...] ("none", 0 at ignored tokens), fp32.
    """
    logits = jnp.einsum("...d,vd->...v", hidden, vocab_weight, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)  # [..., vocab] fp32
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    loss = jnp.where(valid, lse - label_logit + z_loss * jnp.square(lse), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(valid), 1)
