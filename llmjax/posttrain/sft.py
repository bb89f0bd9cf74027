"""Supervised fine-tuning: next-token loss on the response tokens of templated examples.

The loss is the mean negative log-likelihood over the batch's response tokens (prompt and
padding have weight 0, so they contribute no gradient). Packed batches keep examples
apart with segment ids (a block-diagonal attention mask) and per-example positions, so a
packed batch gives the same per-token losses as the same examples one per row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.posttrain.chat import encode_chat, instruction_examples
from llmjax.posttrain.forward import token_logprobs
from llmjax.posttrain.packing import pack_examples, pad_examples
from llmjax.posttrain.run import RunLog, check_enough_fit, load_start, map_rows, trainable_tree
from llmjax.posttrain.step import init_state, make_step
from llmjax.train.optimizer import make_optimizer


def sft_loss(params, graphdef, batch):
    """(mean response-token NLL, {"response_tokens"}) of a batch (`packing.FIELDS`).

    Raises (at trace time, from the model): ValueError if T > model.max_seq_len.
    """
    logp = token_logprobs(params, graphdef, batch["tokens"], batch["targets"],
                          batch["segment_ids"], batch["positions"])
    weights = batch["weights"]
    n = jnp.maximum(weights.sum(), 1.0)
    return -(logp * weights).sum() / n, {"response_tokens": weights.sum()}


def sft_batches(cfg, tokenizer, docs):
    """(train, val) batches (`packing.FIELDS` dicts of [N, T] arrays) of generated examples;
    examples longer than the context are left out (the generator does not know the tokenizer).

    Raises:
      ConfigError: fewer than 2 examples fit seq_len (one for val, one to train on).
    """
    examples = [encode_chat(tokenizer, e.prompt, e.response)
                for e in instruction_examples(docs, cfg.n_examples, cfg.seed)]
    fitting = [e for e in examples if len(e[0]) - 1 <= cfg.seq_len]
    check_enough_fit(cfg, len(fitting), len(examples), "examples")
    examples = fitting
    n_val = max(1, int(len(examples) * cfg.val_fraction))
    make = pack_examples if cfg.pack else pad_examples
    return make(examples[n_val:], cfg.seq_len), pad_examples(examples[:n_val], cfg.seq_len)


def run_sft(cfg):
    """Fine-tune on generated instruction examples; log train loss and val response NLL.
    Returns (cfg, final val loss, the trained tree)."""
    cfg, tokenizer, graphdef, params, docs = load_start(cfg)
    train, val = sft_batches(cfg, tokenizer, docs)
    trainable, frozen, to_params, report = trainable_tree(cfg, params)
    optimizer = make_optimizer(cfg.optim, cfg.steps)
    loss = functools.partial(_loss, graphdef)
    step = make_step(loss, optimizer, to_params)
    row_nll = jax.jit(lambda t, f, b: _row_nll(t if to_params is None else to_params(t, f), graphdef, b))

    def evaluate(trainable, frozen, batch):  # mean NLL over all response tokens of the batch
        nll, n = map_rows(lambda rows: row_nll(trainable, frozen, rows), batch, cfg.batch_size)
        return nll.sum() / max(n.sum(), 1.0)

    log = RunLog(cfg)
    log.write("setup", 0, train_rows=len(train["tokens"]), val_examples=len(val["tokens"]),
              packed=cfg.pack, **report)
    state, rng = init_state(trainable, optimizer), np.random.default_rng(cfg.seed)
    log.write("eval", 0, val_loss=float(evaluate(state["params"], frozen, val)))
    for i in range(1, cfg.steps + 1):
        rows = rng.choice(len(train["tokens"]), cfg.batch_size, replace=len(train["tokens"]) < cfg.batch_size)
        state, metrics = step(state, {k: v[rows] for k, v in train.items()}, frozen)
        if i % cfg.eval_every == 0 or i == cfg.steps:
            val_loss = float(evaluate(state["params"], frozen, val))
            log.write("eval", i, loss=float(metrics["loss"]), val_loss=val_loss)
    return cfg, val_loss, state["params"]


def _row_nll(params, graphdef, batch):
    """(summed response NLL [N], response tokens [N]) per row."""
    logp = token_logprobs(params, graphdef, batch["tokens"], batch["targets"], batch["segment_ids"], batch["positions"])
    return -(logp * batch["weights"]).sum(-1), batch["weights"].sum(-1)


def _loss(graphdef, params, batch):
    return sft_loss(params, graphdef, batch)
