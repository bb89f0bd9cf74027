"""RLHF on generated preferences: a reward model (reward.py), then GRPO (grpo.py) against it
or against the toy target-token reward; each GRPO iteration logs reward, KL, and the
rollout vs train time split."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import DecodeConfig
from llmjax.posttrain.dpo import generated_pairs, pair_rows, preference_batch
from llmjax.posttrain.grpo import GRPO, rollout_prompts, target_token_reward
from llmjax.posttrain.reward import reward_scores, train_reward_model
from llmjax.posttrain.run import RunLog, load_start, trainable_tree
from llmjax.train.optimizer import make_optimizer


def _model_reward(graphdef, prompt_len, rm_params, tokens, weights):
    lengths = prompt_len + weights.sum(1).astype(jnp.int32)  # real tokens: prompt + completion
    return reward_scores(rm_params, graphdef, tokens, lengths)


def run_rlhf(cfg):
    """Reward model (with reward=model) then cfg.steps GRPO iterations. Returns (cfg,
    the GRPO records, the trained policy tree)."""
    cfg, tokenizer, graphdef, params, docs = load_start(cfg)
    pairs = generated_pairs(cfg, tokenizer, docs)
    log = RunLog(cfg)
    trainable, frozen, to_params, report = trainable_tree(cfg, params)
    log.write("setup", 0, pairs=len(pairs), reward=cfg.reward, **report)
    if cfg.reward == "model":
        n_val = max(1, int(len(pairs) * cfg.val_fraction))
        rm_params, _ = train_reward_model(cfg, graphdef, params, preference_batch(tokenizer, pairs[n_val:], cfg.seq_len),
                                          preference_batch(tokenizer, pairs[:n_val], cfg.seq_len), log, pair_rows)
        reward_fn = functools.partial(_model_reward, graphdef, cfg.prompt_tokens)
    else:
        rm_params, reward_fn = None, target_token_reward(cfg.target_token)
    prompts = rollout_prompts(tokenizer, [p.prompt for p in pairs], cfg.prompt_tokens)
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    grpo = GRPO(graphdef, params, make_optimizer(cfg.optim, cfg.steps), reward_fn, decode, cfg.group_size,
                cfg.beta, cfg.clip_eps, eos_id=tokenizer.eos_id, to_params=to_params,
                vocab_size=tokenizer.vocab_size, reward_params=rm_params)
    state, rng, key = grpo.init(trainable), np.random.default_rng(cfg.seed), jax.random.key(cfg.seed)
    records = []
    for i in range(1, cfg.steps + 1):
        ids = rng.choice(len(prompts), cfg.prompts_per_iter, replace=len(prompts) < cfg.prompts_per_iter)
        state, record = grpo.iterate(state, frozen, jnp.asarray(prompts[ids]), jax.random.fold_in(key, i))
        records.append(record)
        if i % cfg.eval_every == 0 or i == cfg.steps or i == 1:
            log.write("grpo", i, **record)
    return cfg, records, state["params"]
