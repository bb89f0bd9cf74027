"""Per-token log-probabilities of a Transformer, with packed sequences kept apart.

Packing puts several examples in one row; attention must not cross them: the model gets
the block-diagonal mask `segment_q == segment_k` (combined with the causal one) and
positions that restart per example.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def hidden_states(params, graphdef, tokens, segment_ids=None, positions=None):
    """Final-norm hidden states [B, T, D] and the model; with segment_ids [B, T] (0 =
    padding), attention stays inside each segment."""
    model = nnx.merge(graphdef, params)
    mask = None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
    return model.hidden_states(tokens, positions, mask=mask)[0], model


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
