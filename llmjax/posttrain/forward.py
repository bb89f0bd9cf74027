"""Per-token log-probabilities of a Transformer, with packed sequences kept apart.

Packing puts several examples in one row; attention must not cross them. The model's
`hidden_states(tokens, positions)` takes positions (we restart them per example) but no
attention mask, and `transformer.py` is not ours to change. So `segment_attention` is a
small scoped hook: while it is active (during tracing), `llmjax.ops.attention` is called
with the block-diagonal mask `segment_q == segment_k`, which `ops.attention_xla` combines
with the causal mask. It must wrap the trace of the forward (our jitted steps do that);
outside it the model is untouched. The clean fix, proposed to the lead: a `mask` argument
threaded through `Transformer.hidden_states -> apply_blocks -> Block -> Attention` into
`ops.attention(..., mask=mask)`; then this hook goes away.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import ops


@contextlib.contextmanager
def segment_attention(segment_ids):
    """Within the block, un-cached self-attention sees only keys of the same segment.

    segment_ids: [B, T] int32 (0 = padding, which sees only padding).
    """
    original = ops.attention
    segment_mask = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]

    def masked(q, k, v, *, causal, impl="auto", mask=None):
        if mask is not None or q.shape[1] != k.shape[1]:  # a cached decode call: leave it alone
            return original(q, k, v, causal=causal, impl=impl, mask=mask)
        return original(q, k, v, causal=causal, impl="xla", mask=segment_mask)

    ops.attention = masked
    try:
        yield
    finally:
        ops.attention = original


def hidden_states(params, graphdef, tokens, segment_ids=None, positions=None):
    """Final-norm hidden states [B, T, D] and the model; with segment_ids, attention stays
    inside each segment (`segment_attention`)."""
    model = nnx.merge(graphdef, params)
    if segment_ids is None:
        return model.hidden_states(tokens, positions)[0], model
    with segment_attention(segment_ids):
        return model.hidden_states(tokens, positions)[0], model


def token_logprobs(params, graphdef, tokens, targets, segment_ids=None, positions=None):
    """log p(targets[b, t] | tokens[b, :t+1]) as [B, T] fp32.

    Args:
      params, graphdef: the model (`llmjax.models.split_model`).
      tokens, targets: [B, T] int32 inputs and next tokens.
      segment_ids: optional [B, T] int32: packed examples (attention within a segment only).
      positions: optional [B, T] int32 positions (restarting per segment when packed).
    """
    hidden, model = hidden_states(params, graphdef, tokens, segment_ids, positions)
    logits = model.logits(hidden)  # [B, T, V] fp32
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logz
