"""Attention in plain jnp and fp32: the definition of correct for every backend.

B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""
import jax
import jax.numpy as jnp
from jax import lax


def _logits_and_mask(q, k, *, causal, scale, segment_ids):
    """Scaled fp32 logits [B, K, G, T, S] and the boolean mask (True = attend), or None."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * scale
    mask = None
    if causal:
        mask = (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]  # [1, T, S]
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
        mask = same if mask is None else mask & same
    return logits, mask


def attention_reference(q, k, v, *, causal=False, scale=None, segment_ids=None, return_lse=False):
    """softmax(scale * q k^T, masked) v in fp32, grouped-query.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (query head n reads kv head n // G).
      causal: query t sees keys s <= t (needs T == S).
      scale: logit scale, default H ** -0.5.
      segment_ids: optional int [B, T] (needs T == S): tokens attend within their own segment.
      return_lse: also return the natural-log log-sum-exp of the logits, [B, N, T] fp32.
    Returns:
      out [B, T, N, H] in fp32 (and lse).
    """
    b, t, n, h = q.shape
    scale = h ** -0.5 if scale is None else scale
    logits, mask = _logits_and_mask(q, k, causal=causal, scale=scale, segment_ids=segment_ids)
    if mask is not None:
        # Every row keeps at least its own key (causal and segments need T == S): no empty rows.
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(jnp.float32),
                     precision=lax.Precision.HIGHEST).reshape(b, t, n, h)
    if return_lse:
        return out, lse.reshape(b, n, t)
    return out
