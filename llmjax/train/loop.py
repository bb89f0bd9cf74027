"""The training loop: data -> model -> steps, with eval, metrics, checkpoints and a sample.

A run lives in `runs/<name>/`: config.yaml, metrics.jsonl, tb/, checkpoints/, samples.txt.
SIGTERM/SIGINT finish the current step, save a checkpoint and return; a non-finite loss
stops the run with `TrainingDiverged`, keeping the last good checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llmjax.checkpoint import Checkpointer
from llmjax.config import ConfigError, ExperimentConfig, save_config
from llmjax.data import BatchIterator, load_dataset
from llmjax.decode import generate
from llmjax.models import count_params, init_model, split_model
from llmjax.train.flops import device_peak_flops, flops_per_token
from llmjax.train.metrics import MetricsLogger
from llmjax.train.optimizer import lr_schedule, make_optimizer
from llmjax.train.step import init_train_state, make_eval_step, make_train_step
from sharding.mesh import make_mesh
from sharding.placement import shard_state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    """What a run ended with."""

    step: int
    train_loss: float
    val_loss: float | None
    unigram_entropy: float
    stopped_by_signal: bool
    sample: str | None
    params: dict


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _eval_batches(windows: np.ndarray, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """A fixed slice of the val windows, in order, so every eval sees the same tokens."""
    n = min(len(windows), batch_size * n_batches)
    size = min(batch_size, n)
    return [windows[i:i + size] for i in range(0, n - size + 1, size)]


def train(cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, init_params: dict | None = None) -> TrainResult:
    """Train `cfg` from scratch (or from `init_params`, e.g. an imported checkpoint), or from
    the newest checkpoint of its run when `resume`.

    `stop_after` ends this call after that step with a checkpoint, as SIGTERM would (for
    time-sliced jobs); the schedule still runs to cfg.train.steps across resumes.

    Raises:
      ConfigError: the tokenizer's vocabulary exceeds model.vocab_size, or the run folder
        already has checkpoints and `resume` is False.
      CheckpointError: `resume` without a readable checkpoint.
      TrainingDiverged: the loss became NaN or infinite.
    """
    tc = cfg.train
    run_dir = cfg.run_dir
    data = load_dataset(cfg.data.corpus, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.val_fraction)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"at least the tokenizer's vocabulary, {data.tokenizer.vocab_size}")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    if not resume and ckpt.latest_step() is not None:
        raise ConfigError("name", cfg.name, f"a new run name: {run_dir} already has checkpoints "
                          "(pass --resume to continue it)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    graphdef, params = split_model(init_model(cfg.model, seed=tc.seed))
    if init_params is not None:
        params = _checked_like(init_params, params)
    optimizer = make_optimizer(cfg.optim, tc.steps)
    state = init_train_state(params, optimizer)
    batches = BatchIterator(data.train, tc.batch_size, seed=tc.seed)
    mesh = rules = None
    if math.prod(cfg.mesh.shape) > 1:  # sharded: lay the state out by its logical names
        mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules
        state = shard_state(state, graphdef, mesh, rules)
    if resume:
        state, meta = ckpt.restore(state)  # restores onto the template's shardings
        batches.restore(meta["data"])
    start = int(state["step"])

    train_step = make_train_step(graphdef, optimizer, lr_schedule(cfg.optim, tc.steps), mesh=mesh, rules=rules)
    eval_step = make_eval_step(graphdef, mesh=mesh, rules=rules)
    val_batches = _eval_batches(data.val, tc.batch_size // tc.grad_accum, tc.eval_batches)
    n_params = count_params(params)
    tokens_per_step = tc.batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens_per_step
    peak = device_peak_flops()
    print(f"{cfg.name}: {n_params / 1e6:.2f}M params, {len(data.train)} train / {len(data.val)} val "
          f"sequences of {cfg.data.seq_len} tokens, unigram entropy {data.unigram_entropy:.3f} nats/token")

    def save(step):
        ckpt.save(step, state, {"data": batches.state(), "step": step})

    logger = MetricsLogger(run_dir)
    train_loss = val_loss = None
    stopped = False
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    try:
        with _StopFlag() as stop:
            for step in range(start + 1, tc.steps + 1):
                batch = next(batches).reshape(tc.grad_accum, -1, cfg.data.seq_len + 1)
                state, metrics = train_step(state, jnp.asarray(batch))
                train_loss = float(metrics["loss"])
                if not np.isfinite(train_loss):
                    raise TrainingDiverged(f"loss is {train_loss} at step {step}; last good checkpoint: "
                                           f"step {ckpt.latest_step()} in {ckpt.directory}")
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}")
                if step % tc.eval_every == 0 or step == tc.steps:
                    val_loss = float(np.mean([eval_step(state["params"], jnp.asarray(b)) for b in val_batches]))
                    elapsed = time.perf_counter() - t_last
                    tok_s = (step - step_last) * tokens_per_step / elapsed
                    mfu = flops_per_step * (step - step_last) / elapsed / peak if peak else None
                    t_last, step_last = time.perf_counter(), step
                    line = (f"step {step:>6} | train {train_loss:.4f} | val {val_loss:.4f} | "
                            f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
                    bar.write(line)
                    logger.log(step, train_loss=train_loss, val_loss=val_loss, tokens_per_s=tok_s, mfu=mfu,
                               lr=metrics["lr"], grad_norm=metrics["grad_norm"])
                else:
                    logger.log(step, train_loss=train_loss, lr=metrics["lr"], grad_norm=metrics["grad_norm"])
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    save(step)
                if stop.signum is not None or step == stop_after:
                    save(step)
                    why = f"signal {signal.Signals(stop.signum).name}" if stop.signum else f"stop_after={stop_after}"
                    bar.write(f"{why}: saved step {step} to {ckpt.directory}; continue with --resume")
                    stopped = True
                    break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        logger.close()

    sample = None
    if tc.sample_tokens > 0 and not stopped:
        sample = sample_text(nnx.merge(graphdef, state["params"]), data.tokenizer, cfg, tc.sample_prompt)
        (run_dir / "samples.txt").write_text(sample)
        print(f"--- sample ({tc.sample_tokens} tokens) ---\n{sample}")
    return TrainResult(step=int(state["step"]), train_loss=train_loss, val_loss=val_loss,
                       unigram_entropy=data.unigram_entropy, stopped_by_signal=stopped, sample=sample,
                       params=state["params"])


def _checked_like(given: dict, fresh: dict) -> dict:
    """`given` as fp32-or-param-dtype jax arrays, after checking it has `fresh`'s structure and shapes."""
    if jax.tree.structure(given) != jax.tree.structure(fresh):
        raise ConfigError("init_params", "<tree>", "the parameter tree of model.* (same names and nesting)")
    for path, g, f in zip(jax.tree_util.tree_leaves_with_path(fresh), jax.tree.leaves(given), jax.tree.leaves(fresh)):
        if g.shape != f.shape:
            raise ConfigError("init_params" + jax.tree_util.keystr(path[0]), g.shape, f"shape {f.shape}")
    return jax.tree.map(lambda g, f: jnp.asarray(g, f.dtype), given, fresh)


def sample_text(model, tokenizer, cfg: ExperimentConfig, prompt: str) -> str:
    """Decode `cfg.train.sample_tokens` tokens after `prompt` with cfg.decode's sampling."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    budget = cfg.model.max_seq_len - len(ids)
    decode = dataclasses.replace(cfg.decode, max_new_tokens=min(cfg.train.sample_tokens, budget))
    out = generate(model, jnp.asarray([ids], jnp.int32), decode, vocab_size=tokenizer.vocab_size)
    return tokenizer.decode(np.asarray(out[0]).tolist())
