"""What every post-training entry point shares: the starting model and tokenizer, the
trained tree (full params, LoRA or QLoRA adapters), and the metrics log."""
from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import lora as lora_lib
from llmjax.config import ConfigError, save_config
from llmjax.data import load_corpus, load_tokenizer
from llmjax.models import init_model, split_model
from llmjax.posttrain.config import PosttrainConfig


def load_start(cfg: PosttrainConfig):
    """(cfg, tokenizer, graphdef, params, docs): the starting model (a pretraining run's,
    with `init_from`, or fresh), its tokenizer and the corpus documents.

    Raises:
      ConfigError: model.vocab_size smaller than the tokenizer's.
    """
    if cfg.init_from:
        from llmjax.runs import load_run

        run_cfg, model, tokenizer = load_run(cfg.init_from)
        cfg = dataclasses.replace(cfg, model=run_cfg.model, tokenizer=run_cfg.data.tokenizer)
        graphdef, params = split_model(model)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                              f"at least the tokenizer's vocab_size={tokenizer.vocab_size}")
        graphdef, params = split_model(init_model(cfg.model, seed=cfg.seed))
    return cfg, tokenizer, graphdef, params, load_corpus(cfg.corpus)


def check_enough_fit(cfg: PosttrainConfig, fitting: int, made: int, what: str):
    """Raise ConfigError unless at least 2 of the `made` generated `what` fit cfg.seq_len (one
    held out, one to train on); the generators do not know the tokenizer, so some may not."""
    if fitting < 2:
        raise ConfigError("n_examples", cfg.n_examples, f"enough {what}: {fitting} of {made} fit "
                          f"seq_len={cfg.seq_len} and 2 are needed (one held out); raise n_examples or seq_len")


def trainable_tree(cfg: PosttrainConfig, params):
    """(trainable, frozen, to_params, report): what the optimizer updates. Full fine-tuning
    trains the params; lora.rank >= 1 trains adapters on the frozen params; qlora stores
    the frozen params in 4-bit (see qlora.py). `report` holds sizes for the log."""
    if cfg.lora.rank < 1:  # a copy: steps donate the trained tree, and `params` may stay the reference
        return jax.tree.map(jnp.copy, params), None, None, {"trainable_params": _count(params)}
    adapters = lora_lib.init_adapters(params, cfg.lora, jax.random.key(cfg.seed + 7))
    report = {"trainable_params": _count(adapters)}
    if cfg.qlora:
        from llmjax.posttrain import qlora

        base = qlora.quantize_base(params, block=cfg.qlora_block)
        report.update(qlora.memory_report(params, base))
        return adapters, base, lambda a, b: qlora.attach(b, a, cfg.lora), report
    return adapters, params, lambda a, b: lora_lib.merge(b, a, cfg.lora), report


def _count(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


class RunLog:
    """runs/<name>/: config.yaml, metrics.jsonl (one JSON object per record), and one
    printed line per record."""

    def __init__(self, cfg: PosttrainConfig):
        self.dir = cfg.run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.dir / "config.yaml")
        self.path = self.dir / "metrics.jsonl"
        self.path.write_text("")
        self.start = time.perf_counter()

    def write(self, kind: str, step: int, **values):
        row = {"kind": kind, "step": step, "time_s": round(time.perf_counter() - self.start, 3)}
        row.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                         if k not in ("kind", "step"))
        print(f"{kind} step {step}: {shown}", flush=True)
        return row


def _plain(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()



def map_rows(fn, batch: dict, size: int):
    """fn(rows) over consecutive row chunks of a batch (a dict of [N, ...] arrays), outputs
    concatenated on axis 0: evaluation and reference log-probs of a whole data set without
    materializing [N, T, vocab] logits at once. The last chunk is padded by repeating rows
    (then dropped), so `fn` compiles once."""
    n = len(next(iter(batch.values())))
    outs = []
    for start in range(0, n, size):
        idx = np.minimum(np.arange(start, start + size), n - 1)
        kept = min(size, n - start)
        out = fn({k: v[idx] for k, v in batch.items()})
        outs.append(jax.tree.map(lambda x, kept=kept: np.asarray(x)[:kept], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
