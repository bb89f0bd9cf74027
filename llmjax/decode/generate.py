"""Autoregressive generation with a KV cache, all new tokens in one device call.

The prompt is prefilled in one forward pass; the remaining tokens come from a
`lax.fori_loop` of single-token steps, so there is no Python round-trip per token.
"""
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import DecodeConfig
from llmjax.decode.sampling import sample_logits
from llmjax.models.kv_cache import init_cache


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_size"))
def _generate(graphdef, params, prompt, key, *, max_new_tokens, temperature, top_k, top_p, vocab_size):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    b, t0 = prompt.shape
    total = t0 + max_new_tokens
    def sample(logits, key):
        if vocab_size is not None:  # ids past the tokenizer's vocabulary are never produced
            logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
        return sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)

    cache = init_cache(cfg, b, total)
    positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (b, t0))
    logits, cache = model(prompt, positions, cache)  # prefill: [B, T0, V]
    keys = jax.random.split(key, max_new_tokens)
    tokens = jnp.zeros((b, total), jnp.int32).at[:, :t0].set(prompt)
    tokens = tokens.at[:, t0].set(sample(logits[:, -1], keys[0]))

    def step(i, carry):  # token at position t0 + i is known; predict t0 + i + 1
        tokens, cache = carry
        pos = t0 + i
        current = jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1)  # [B, 1]
        logits, cache = model(current, jnp.full((b, 1), pos, jnp.int32), cache)
        nxt = sample(logits[:, -1], keys[i + 1])
        return jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1), cache

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (tokens, cache))
    return tokens


def generate(model, prompt, cfg: DecodeConfig, key=None, vocab_size: int | None = None):
    """Continue `prompt` [B, T0] int32 by cfg.max_new_tokens tokens; returns [B, T0 + new].

    `vocab_size` (the tokenizer's) restricts sampling to ids below it when the model's
    embedding table is larger (padded vocabularies).

    Raises:
      ValueError: empty prompt, or T0 + max_new_tokens > model.max_seq_len.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length>=1] token ids, got shape {prompt.shape}")
    total = prompt.shape[1] + cfg.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + decode.max_new_tokens={cfg.max_new_tokens} "
                         f"= {total} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    graphdef, params = nnx.split(model)
    key = jax.random.key(cfg.seed) if key is None else key
    return _generate(graphdef, params, prompt, key, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                     vocab_size=vocab_size)
