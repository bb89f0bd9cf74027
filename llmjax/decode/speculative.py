"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Each round the draft proposes `gamma` tokens one by one; the target scores all of them in one
forward over gamma + 1 positions; draft token i is kept with probability min(1, p_i / q_i), the
first rejected one is replaced by a draw from norm(max(0, p - q)), and when all are kept a bonus
token comes from the target's next distribution. The accepted tokens are distributed exactly as
the target's own samples (Leviathan et al., appendix A.1); with temperature 0 they are the
target's greedy tokens as the model's own layers compute them (`generate` with
decode.fused_matvec=false and decode.persistent_step=false; the kernel loops round in other places
and may part from them at a near-tie). The whole generation is one device call: a
`lax.while_loop` over rounds.

Caches: rows before the last known token are in both caches; a rejected suffix needs no undo,
since `attend_cached` hides slots past each query's position and the next round overwrites them.
On a GPU a batch-1 draft decodes as two identical rows, as `generate` does (doubles_single_row):
its one-token steps are the ones a single row slows down.
"""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.config import DecodeConfig
from llmjax.decode.generate import (DECODE_COMPILER_OPTIONS, check_prompt, doubled, doubles_single_row,
                                    forward_hidden, graphdef_for, init_layer_caches, prepare_decode,
                                    split_layers)
from llmjax.decode.sampling import filter_logits, greedy


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """tokens [B, T0 + new]; per row: rounds run, draft tokens accepted, draft tokens rejected
    (at most one per round)."""

    tokens: jax.Array
    rounds: np.ndarray
    accepted: np.ndarray
    rejected: np.ndarray

    @property
    def acceptance_rate(self) -> float:
        """alpha: accepted draft tokens over the draft tokens the target judged (those after a
        rejection in the same round are never judged)."""
        judged = self.accepted.sum() + self.rejected.sum()
        return float(self.accepted.sum() / judged) if judged else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Tokens each target forward produced: accepted drafts + the resampled or bonus token."""
        return float((self.accepted.sum() + self.rounds.sum()) / max(self.rounds.sum(), 1))


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): Leviathan et al. 2023, eq. 1 (i.i.d. acceptance)."""
    return gamma + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def _speculate_row(target, draft, prompt, key, *, max_new_tokens, gamma, temperature, top_k, top_p,
                   vocab_size, double_draft):
    """One sequence: prompt [1, T0] -> (tokens [1, T0 + new], rounds, accepted, rejected).
    double_draft: the draft's cache holds two identical rows and each draft forward runs on both
    (row 0 read)."""
    t0 = prompt.shape[1]
    total = t0 + max_new_tokens
    length = total + gamma  # a round may write gamma tokens past `total`
    is_greedy = temperature == 0.0
    filtered = partial(filter_logits, temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
                       vocab_size=vocab_size)

    def sample(logits, key):  # logits [..., V] -> ids [...]
        return greedy(logits, vocab_size) if is_greedy else jax.random.categorical(key, filtered(logits))

    def at(start, n):  # positions [1, n] from start
        return (start + jnp.arange(n, dtype=jnp.int32))[None]

    target_layers, draft_layers = split_layers(target), split_layers(draft)

    def run_target(tokens, positions, caches):  # -> logits [1, T, V], caches
        hidden, caches = forward_hidden(target, target_layers, tokens, positions, caches)
        return target.logits(hidden), caches

    def run_draft(tokens, positions, caches):  # -> logits [V] of the last position, caches
        if double_draft:
            tokens, positions = jnp.concatenate([tokens, tokens]), jnp.concatenate([positions, positions])
        hidden, caches = forward_hidden(draft, draft_layers, tokens, positions, caches)
        return draft.logits(hidden[:, -1:])[0, 0], caches  # both rows: no one-row head product

    hidden, target_cache = forward_hidden(target, target_layers, prompt, at(0, t0),
                                          init_layer_caches(target.cfg, 1, length))
    _, draft_cache = forward_hidden(draft, draft_layers, prompt, at(0, t0), init_layer_caches(draft.cfg, 1, length))
    if double_draft:  # the prompt is prefilled once
        draft_cache = doubled(draft_cache)
    key, first_key = jax.random.split(key)
    first = sample(target.logits(hidden[:, -1:])[0, 0], first_key)
    tokens = jnp.zeros((1, length), jnp.int32).at[:, :t0].set(prompt).at[0, t0].set(first)
    vocab = target.cfg.vocab_size

    def round_(state):
        tokens, n, target_cache, draft_cache, key, rounds, accepted, rejected = state
        # Tokens < n are final; caches hold positions < n - 1. Draft: feed n-2 (again, or for the
        # first time after a round that kept all drafts) and n-1, then each new draft token.
        key, draft_key, accept_key, final_key = jax.random.split(key, 4)
        draft_keys = jax.random.split(draft_key, gamma)
        logits, draft_cache = run_draft(jax.lax.dynamic_slice_in_dim(tokens, n - 2, 2, 1), at(n - 2, 2), draft_cache)
        # Draft probabilities (sampling only); row gamma stays 0, so its residual is p: the bonus.
        q = None if is_greedy else jnp.zeros((gamma + 1, vocab), jnp.float32)

        def draft_step(i, carry):  # draft token i goes to position n + i
            tokens, draft_cache, q, logits = carry
            token = sample(logits, draft_keys[i])
            if not is_greedy:
                q = q.at[i].set(jax.nn.softmax(filtered(logits)))
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[None, None], n + i, 1)
            logits, draft_cache = run_draft(token[None, None], at(n + i, 1), draft_cache)
            return tokens, draft_cache, q, logits

        tokens, draft_cache, q, logits = jax.lax.fori_loop(
            0, gamma - 1, draft_step, (tokens, draft_cache, q, logits))
        last = sample(logits, draft_keys[gamma - 1])
        if not is_greedy:
            q = q.at[gamma - 1].set(jax.nn.softmax(filtered(logits)))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, last[None, None], n + gamma - 1, 1)

        # Target: one forward over the last known token and the gamma drafts.
        window = jax.lax.dynamic_slice_in_dim(tokens, n - 1, gamma + 1, 1)  # [1, gamma + 1]
        target_logits, target_cache = run_target(window, at(n - 1, gamma + 1), target_cache)
        target_logits = target_logits[0]  # [gamma + 1, V]: row i predicts position n + i
        drafts = window[0, 1:]  # [gamma]
        if is_greedy:
            choice = greedy(target_logits, vocab_size)
            keep = drafts == choice[:gamma]
        else:
            p = jax.nn.softmax(filtered(target_logits))  # [gamma + 1, V]
            p_d = jnp.take_along_axis(p[:gamma], drafts[:, None], 1)[:, 0]
            q_d = jnp.take_along_axis(q[:gamma], drafts[:, None], 1)[:, 0]
            keep = jax.random.uniform(accept_key, (gamma,)) * q_d < p_d  # r < p/q, q_d > 0
        n_keep = jnp.sum(jnp.cumprod(keep))  # leading accepted drafts
        if is_greedy:
            new = choice[n_keep]
        else:
            residual = jnp.maximum(p[n_keep] - q[n_keep], 0.0)  # = p[gamma] when all were kept
            residual = jnp.where(residual.sum() > 0, residual, p[n_keep])
            new = jax.random.categorical(final_key, jnp.log(residual))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new.astype(jnp.int32)[None, None], n + n_keep, 1)
        return (tokens, n + n_keep + 1, target_cache, draft_cache, key, rounds + 1,
                accepted + n_keep, rejected + (n_keep < gamma))

    zero = jnp.int32(0)
    state = (tokens, jnp.int32(t0 + 1), target_cache, draft_cache, key, zero, zero, zero)
    tokens, _, _, _, _, rounds, accepted, rejected = jax.lax.while_loop(
        lambda s: s[1] < total, round_, state)
    return tokens[:, :total], rounds, accepted, rejected


@partial(jax.jit, static_argnames=("target_def", "draft_def", "max_new_tokens", "gamma", "temperature",
                                   "top_k", "top_p", "vocab_size", "double_draft"),
         compiler_options=DECODE_COMPILER_OPTIONS)
def _speculative(target_def, target_params, draft_def, draft_params, prompt, keys, **options):
    target, draft = nnx.merge(target_def, target_params), nnx.merge(draft_def, draft_params)
    row = partial(_speculate_row, target, draft, **options)
    if prompt.shape[0] == 1:  # no vmap: keeps the cache updates dynamic slices, not scatters
        tokens, *counts = row(prompt, keys[0])
        return tokens, *(c[None] for c in counts)
    tokens, *counts = jax.vmap(row)(prompt[:, None], keys)  # rows advance independently
    return tokens[:, 0], *counts


def speculative_generate(target, draft, prompt, cfg: DecodeConfig, *, gamma: int = 4, key=None,
                         vocab_size: int | None = None) -> SpeculativeResult:
    """Continue `prompt` [B, T0] by cfg.max_new_tokens tokens from `target`, drafted by `draft`.

    Args:
      target, draft: Transformers or `prepare_decode` results with the same vocabulary.
      prompt: [B, T0] int32; rows advance independently (vmapped) when B > 1.
      cfg: sampling options as for `generate` (temperature 0 = greedy, equal to the target's
        greedy `generate`; otherwise the target's distribution after top_k / top_p).
      gamma: draft tokens per round, >= 1.
    Returns:
      SpeculativeResult with tokens [B, T0 + new] and the acceptance counts.
    Raises:
      ValueError: gamma < 1, vocabularies differ, or T0 + new + gamma exceeds either model's
        max_seq_len (a round may run gamma positions past the end).
    """
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be an integer >= 1 (draft tokens per round)")
    target, draft = prepare_decode(target), prepare_decode(draft)
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocab_size={draft.cfg.vocab_size} differs from the target's "
                         f"{target.cfg.vocab_size}; the draft must share the target's vocabulary")
    limit = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    prompt = check_prompt(prompt, cfg.max_new_tokens + gamma, limit, "decode.max_new_tokens + gamma")
    key = jax.random.key(cfg.seed) if key is None else key
    keys = jax.random.split(key, prompt.shape[0])
    tokens, rounds, accepted, rejected = _speculative(
        target.graphdef, target.params, draft.graphdef, draft.params, prompt, keys,
        max_new_tokens=cfg.max_new_tokens, gamma=gamma, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, vocab_size=vocab_size, double_draft=doubles_single_row(prompt))
    return SpeculativeResult(tokens, np.asarray(rounds), np.asarray(accepted), np.asarray(rejected))


def truncated_draft(model, n_layers: int):
    """A draft that is the target's first `n_layers` blocks with its embeddings and head
    (self-speculative, early-exit drafting; Zhang et al. 2023 "Draft & Verify"). Shares arrays
    with `model` (no copy of the kept weights beyond the block slice).

    Raises:
      ValueError: n_layers not in [1, model.cfg.n_layers].
    """
    full = model.cfg.n_layers
    if not 1 <= n_layers <= full:
        raise ValueError(f"n_layers={n_layers} must be in [1, {full}] (the target's model.n_layers)")
    state = nnx.state(model)
    state["blocks"] = jax.tree.map(lambda x: x[:n_layers], state["blocks"])
    return nnx.merge(graphdef_for(type(model), dataclasses.replace(model.cfg, n_layers=n_layers)), state)
