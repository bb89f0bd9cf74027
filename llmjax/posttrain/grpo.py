"""GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1): PPO's clipped objective with
group-relative advantages and no value model, plus a KL penalty to the frozen reference.

Each iteration samples `group_size` completions per prompt with the batched, jitted decode
path (`llmjax.decode.generate`), scores them, and takes one optimizer step on

    loss = -mean_seq( mean_tok( min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) - beta * KL ) )

with rho = pi / pi_old per token, A = (r - mean_group r) / (std_group r + 1e-6), and the
unbiased KL estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3, as in the paper).
Tokens after a completion's first EOS are masked out. Rollout and train time are timed
apart: that split is where RLHF systems spend their effort.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.config import DecodeConfig
from llmjax.decode import generate
from llmjax.posttrain.forward import token_logprobs
from llmjax.posttrain.step import init_state, make_step


def completion_mask(tokens, prompt_len: int, eos_id: int | None):
    """[B, T - 1] float weights over next-token targets: 1 on completion tokens up to and
    including the first EOS, 0 on the prompt and after the EOS."""
    targets = tokens[:, 1:]
    in_completion = jnp.arange(targets.shape[1]) >= prompt_len - 1
    if eos_id is None:
        return in_completion[None].astype(jnp.float32).repeat(tokens.shape[0], 0)
    is_eos = (targets == eos_id) & in_completion
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before this target
    return (in_completion & (eos_before == 0)).astype(jnp.float32)


def group_advantages(rewards, group_size: int):
    """[B] rewards (groups of `group_size` consecutive rows) -> normalized advantages [B]."""
    r = rewards.reshape(-1, group_size)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).reshape(-1)


def grpo_loss(params, graphdef, batch, beta: float, clip_eps: float):
    """(loss, metrics) of a rollout batch: tokens [B, T], weights [B, T - 1], old_logp and
    ref_logp [B, T - 1], advantages [B]. Metrics: kl (mean per token), clip_fraction."""
    tokens, weights = batch["tokens"], batch["weights"]
    logp = token_logprobs(params, graphdef, tokens[:, :-1], tokens[:, 1:])
    ratio = jnp.exp(logp - batch["old_logp"])
    adv = batch["advantages"][:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = batch["ref_logp"] - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1
    n_tok = jnp.maximum(weights.sum(1), 1.0)
    per_seq = ((surrogate - beta * kl) * weights).sum(1) / n_tok
    metrics = {"kl": (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0),
               "clip_fraction": ((jnp.abs(ratio - 1) > clip_eps) * weights).sum() / jnp.maximum(weights.sum(), 1.0)}
    return -per_seq.mean(), metrics


def target_token_reward(target: int):
    """A toy reward: the share of completion tokens equal to `target`."""
    def reward(_, tokens, weights):
        hits = (tokens[:, 1:] == target) * weights
        return hits.sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return reward


@dataclasses.dataclass
class GRPO:
    """The GRPO loop's pieces, built once: `iterate(state, frozen, prompts, key)` runs one
    rollout + update and returns (state, record). `reward_fn(reward_params, tokens [B, T],
    weights [B, T - 1]) -> [B]` scores the rollouts (jitted with the rest of the scoring;
    params travel as arguments, never as constants baked into the program)."""

    graphdef: object
    ref_params: dict
    optimizer: object
    reward_fn: object
    decode: DecodeConfig
    group_size: int
    beta: float
    clip_eps: float
    eos_id: int | None = None
    to_params: object = None
    vocab_size: int | None = None
    reward_params: dict | None = None

    def __post_init__(self):
        loss = functools.partial(_loss, self.graphdef, self.beta, self.clip_eps)
        self.step = make_step(loss, self.optimizer, self.to_params)
        self.params_of = jax.jit(lambda t, f: t if self.to_params is None else self.to_params(t, f))
        self.score = jax.jit(self._score, static_argnums=4)

    def init(self, trainable):
        """The train state of `trainable` (copied: steps donate it, and it may be the reference)."""
        return init_state(jax.tree.map(jnp.copy, trainable), self.optimizer)

    def _score(self, params, ref_params, reward_params, tokens, prompt_len):
        weights = completion_mask(tokens, prompt_len, self.eos_id)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        old = token_logprobs(params, self.graphdef, inputs, targets)
        ref = token_logprobs(ref_params, self.graphdef, inputs, targets)
        rewards = self.reward_fn(reward_params, tokens, weights)
        return {"tokens": tokens, "weights": weights, "old_logp": old, "ref_logp": ref,
                "advantages": group_advantages(rewards, self.group_size)}, rewards

    def iterate(self, state, frozen, prompts, key):
        """One iteration on prompts [P, T0] (each repeated group_size times)."""
        t0 = time.perf_counter()
        params = self.params_of(state["params"], frozen)
        model = nnx.merge(self.graphdef, params)
        rollouts = generate(model, jnp.repeat(prompts, self.group_size, axis=0), self.decode, key,
                            vocab_size=self.vocab_size)
        rollouts.block_until_ready()
        t1 = time.perf_counter()
        batch, rewards = self.score(params, self.ref_params, self.reward_params, rollouts, prompts.shape[1])
        state, metrics = self.step(state, batch, frozen)
        metrics["loss"].block_until_ready()
        t2 = time.perf_counter()
        record = {"reward": float(rewards.mean()), "kl": float(metrics["kl"]), "loss": float(metrics["loss"]),
                  "completion_tokens": float(batch["weights"].sum(1).mean()),
                  "rollout_s": t1 - t0, "train_s": t2 - t1}
        return state, record


def _loss(graphdef, beta, clip_eps, params, batch):
    return grpo_loss(params, graphdef, batch, beta, clip_eps)


def rollout_prompts(tokenizer, prompts: list[str], prompt_tokens: int) -> np.ndarray:
    """[P, prompt_tokens] int32: the last prompt_tokens ids of each templated prompt (the
    decode path takes equal-length prompts); prompts shorter than that are left out.

    Raises:
      ValueError: no prompt is long enough.
    """
    from llmjax.posttrain.chat import format_prompt

    ids = [tokenizer.encode(format_prompt(p)) for p in prompts]
    kept = [i[-prompt_tokens:] for i in ids if len(i) >= prompt_tokens]
    if not kept:
        raise ValueError(f"no prompt has prompt_tokens={prompt_tokens} tokens (longest: "
                         f"{max(map(len, ids), default=0)}); lower prompt_tokens")
    return np.asarray(kept, np.int32)
