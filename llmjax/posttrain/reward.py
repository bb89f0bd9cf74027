"""A reward model: the Transformer with a scalar head on the last token's hidden state,
trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
(Ouyang et al. 2022, "Training language models to follow instructions", eq. 1).

Its params are {"model": the Transformer's params, "head": {"w": [D], "b": []}}; the head
starts at zero, so every sequence starts with reward 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.posttrain.forward import hidden_states
from llmjax.posttrain.run import map_rows
from llmjax.posttrain.step import init_state, make_step
from llmjax.train.optimizer import make_optimizer


def init_reward_model(params, d_model: int) -> dict:
    """Reward-model params from a language model's params (copied) and a zero scalar head."""
    return {"model": jax.tree.map(jnp.array, params),
            "head": {"w": jnp.zeros((d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}}


def reward_scores(rm_params, graphdef, tokens, lengths):
    """Scalar rewards [B] fp32 of sequences tokens [B, T] whose first lengths[b] tokens are
    real (the rest padding): the head applied to the hidden state of token lengths[b] - 1."""
    hidden, _ = hidden_states(rm_params["model"], graphdef, tokens)  # [B, T, D]
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, D]
    head = rm_params["head"]
    return last.astype(jnp.float32) @ head["w"] + head["b"]


def bradley_terry_loss(r_chosen, r_rejected):
    """(mean -log sigmoid(r_chosen - r_rejected), {"accuracy", "reward_margin"})."""
    margin = r_chosen - r_rejected
    return -jax.nn.log_sigmoid(margin).mean(), {"accuracy": (margin > 0).mean(), "reward_margin": margin.mean()}


def _pair_loss(graphdef, rm_params, batch):
    """Bradley-Terry loss of a preference batch (`dpo.preference_batch` rows): each row is
    scored at its last input token (the response's last token before EOS)."""
    lengths = (batch["segment_ids"] > 0).sum(-1)
    scores = reward_scores(rm_params, graphdef, batch["tokens"], lengths)
    n = scores.shape[0] // 2
    return bradley_terry_loss(scores[:n], scores[n:])


def train_reward_model(cfg, graphdef, params, train, val, log, pair_rows):
    """Train a reward model from `params` for cfg.rm_steps on preference batches; logs
    "reward_model" records (loss, held-out accuracy). Returns its params and the held-out
    metrics. `pair_rows(batch, ids, n)` picks the chosen and rejected rows of pairs `ids`."""
    optimizer = make_optimizer(cfg.optim, cfg.rm_steps)
    loss = functools.partial(_pair_loss, graphdef)
    step = make_step(loss, optimizer)
    scores = jax.jit(lambda p, b: reward_scores(p, graphdef, b["tokens"], (b["segment_ids"] > 0).sum(-1)))

    def evaluate(rm_params, batch):  # Bradley-Terry metrics over all pairs of the batch
        r = map_rows(lambda rows: scores(rm_params, rows), batch, 2 * cfg.batch_size)
        return bradley_terry_loss(r[: len(r) // 2], r[len(r) // 2:])[1]

    state = init_state(init_reward_model(params, cfg.model.d_model), optimizer)
    n_train, rng, held_out = len(train["tokens"]) // 2, np.random.default_rng(cfg.seed), None
    for i in range(1, cfg.rm_steps + 1):
        ids = rng.choice(n_train, cfg.batch_size, replace=n_train < cfg.batch_size)
        state, metrics = step(state, pair_rows(train, ids, n_train))
        if i % cfg.eval_every == 0 or i == cfg.rm_steps:
            held_out = {k: float(v) for k, v in evaluate(state["params"], val).items()}
            log.write("reward_model", i, loss=float(metrics["loss"]), val_accuracy=held_out["accuracy"],
                      val_reward_margin=held_out["reward_margin"])
    return state["params"], held_out
