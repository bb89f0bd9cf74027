"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model", eq. 7).

With log-ratios against a frozen reference, h = beta * ((log pi(y_w|x) - log ref(y_w|x))
- (log pi(y_l|x) - log ref(y_l|x))), the loss is -log sigmoid(h) averaged over pairs. The
implicit reward of a response is beta * (log pi - log ref); we report the chosen and
rejected rewards, their margin, and accuracy (share of pairs with margin > 0). The
reference log-probs are computed once, before training (the reference never changes).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from llmjax.posttrain.chat import Preference, encode_chat, fits, preference_pairs
from llmjax.posttrain.forward import token_logprobs
from llmjax.posttrain.packing import pad_examples
from llmjax.posttrain.run import RunLog, check_enough_fit, load_start, map_rows, trainable_tree
from llmjax.posttrain.step import init_state, make_step
from llmjax.train.optimizer import make_optimizer


def preference_batch(tokenizer, pairs: list[Preference], seq_len: int) -> dict[str, np.ndarray]:
    """Padded rows (`packing.FIELDS`) of the pairs: rows [0, N) chosen, [N, 2N) rejected.

    Raises:
      ValueError: no pairs, a pair whose chosen equals its rejected response, or a pair
        longer than the context.
    """
    if not pairs:
        raise ValueError("no preference pairs: DPO and the reward model need at least one")
    for i, p in enumerate(pairs):
        if p.chosen == p.rejected:
            raise ValueError(f"preference pair {i} has chosen == rejected ({p.chosen[:40]!r}): it carries "
                             "no preference; drop it")
    examples = [encode_chat(tokenizer, p.prompt, p.chosen) for p in pairs]
    examples += [encode_chat(tokenizer, p.prompt, p.rejected) for p in pairs]
    return pad_examples(examples, seq_len)


def sequence_logprobs(params, graphdef, batch):
    """Sum of the response tokens' log-probs per row: [rows] fp32."""
    logp = token_logprobs(params, graphdef, batch["tokens"], batch["targets"], positions=batch["positions"])
    return (logp * batch["weights"]).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean DPO loss, metrics) from [N] sequence log-probs of the policy and the reference.

    Metrics: reward_chosen, reward_rejected (means of beta * log-ratio), reward_margin
    (their mean difference), accuracy (share of pairs whose margin is > 0).
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    metrics = {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
               "reward_margin": margin.mean(), "accuracy": (margin > 0).mean()}
    return -jax.nn.log_sigmoid(margin).mean(), metrics


def _pair_loss(graphdef, beta, params, batch):
    logp = sequence_logprobs(params, graphdef, batch)
    n = logp.shape[0] // 2
    return dpo_loss(logp[:n], logp[n:], batch["ref"][:n], batch["ref"][n:], beta)


def generated_pairs(cfg, tokenizer, docs) -> list[Preference]:
    """cfg.n_examples generated preference pairs, less those whose chosen or rejected
    example does not fit cfg.seq_len (the generator does not know the tokenizer).

    Raises:
      ConfigError: fewer than 2 pairs fit (one is held out, one trains).
    """
    pairs = preference_pairs(docs, cfg.n_examples, cfg.seed)
    fitting = [p for p in pairs
               if fits(tokenizer, p.prompt, p.chosen, cfg.seq_len) and fits(tokenizer, p.prompt, p.rejected, cfg.seq_len)]
    check_enough_fit(cfg, len(fitting), len(pairs), "preference pairs")
    return fitting


def pair_rows(batch, pair_ids, n_pairs):
    """The chosen then rejected rows of the pairs `pair_ids`."""
    rows = np.concatenate([pair_ids, pair_ids + n_pairs])
    return {k: v[rows] for k, v in batch.items()}


def run_dpo(cfg):
    """DPO on generated preference pairs; logs train loss, held-out reward margin and
    accuracy. Returns (cfg, final held-out metrics, the trained tree)."""
    cfg, tokenizer, graphdef, params, docs = load_start(cfg)
    pairs = generated_pairs(cfg, tokenizer, docs)
    n_val = max(1, int(len(pairs) * cfg.val_fraction))
    train = preference_batch(tokenizer, pairs[n_val:], cfg.seq_len)
    val = preference_batch(tokenizer, pairs[:n_val], cfg.seq_len)
    reference = jax.jit(functools.partial(sequence_logprobs, graphdef=graphdef))
    for batch in (train, val):  # the frozen reference, once
        batch["ref"] = map_rows(lambda rows: reference(params, batch=rows), batch, 2 * cfg.batch_size)

    trainable, frozen, to_params, report = trainable_tree(cfg, params)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    loss = functools.partial(_pair_loss, graphdef, cfg.beta)
    step = make_step(loss, optimizer, to_params)
    policy = jax.jit(lambda t, f, b: sequence_logprobs(t if to_params is None else to_params(t, f), graphdef, b))

    def evaluate(trainable, frozen, batch):  # DPO metrics over all pairs of the batch
        logp = map_rows(lambda rows: policy(trainable, frozen, rows), batch, 2 * cfg.batch_size)
        n = len(logp) // 2
        return dpo_loss(logp[:n], logp[n:], batch["ref"][:n], batch["ref"][n:], cfg.beta)[1]

    log = RunLog(cfg)
    log.write("setup", 0, train_pairs=len(pairs) - n_val, val_pairs=n_val, beta=cfg.beta, **report)
    n_train, rng = len(pairs) - n_val, np.random.default_rng(cfg.seed)
    state, held_out = init_state(trainable, optimizer), None
    for i in range(1, cfg.steps + 1):
        ids = rng.choice(n_train, cfg.batch_size, replace=n_train < cfg.batch_size)
        state, metrics = step(state, pair_rows(train, ids, n_train), frozen)
        if i % cfg.eval_every == 0 or i == cfg.steps:
            held_out = {k: float(v) for k, v in evaluate(state["params"], frozen, val).items()}
            log.write("eval", i, loss=float(metrics["loss"]), train_accuracy=float(metrics["accuracy"]),
                      **{f"val_{k}": v for k, v in held_out.items()})
    return cfg, held_out, state["params"]
