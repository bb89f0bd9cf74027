"""The training loop: data -> model -> steps, with eval, metrics, checkpoints and a sample.

A run lives in `runs/<name>/`: config.yaml, metrics.jsonl, tb/, checkpoints/, samples.txt.
SIGTERM/SIGINT finish the current step, save a checkpoint and return; a non-finite loss
stops the run with `TrainingDiverged`, keeping the last good checkpoint (losses are
checked before every save). The host never waits on a step except at log points.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from llmjax import lora
from llmjax.checkpoint import Checkpointer, CheckpointError
from llmjax.config import ConfigError, ExperimentConfig, save_config
from llmjax.data import BatchIterator, load_dataset
from llmjax.decode import generate
from llmjax.models import count_params, init_model, split_model
from llmjax.train.flops import device_peak_flops, flops_per_token, matmul_params
from llmjax.train.metrics import MetricsLogger
from llmjax.train.optimizer import lr_schedule, make_optimizer
from llmjax.train.step import (
    init_train_state,
    lora_shardings,
    make_eval_step,
    make_train_step,
)
from sharding.mesh import make_mesh
from sharding.pipeline import check_pipeline, make_pipeline_train_step, pipeline_rules, pipeline_state_shardings
from sharding.placement import batch_ways, shard_batch, shard_state


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
    params: dict  # the model's params (for a LoRA run: merged with the adapters)
    trainable_params: int
    adapters: dict | None = None  # a LoRA run's trained adapters


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


def _eval_batches(windows: np.ndarray, batch_size: int, n_batches: int, ways: int = 1) -> list[np.ndarray]:
    """A fixed slice of the val windows, in order, so every eval sees the same tokens; batches
    of a multiple of `ways` (the mesh's batch split), none if there are fewer windows."""
    n = min(len(windows), batch_size * n_batches)
    size = min(batch_size, n) // ways * ways
    return [windows[i:i + size] for i in range(0, n - size + 1, size)] if size else []


def train(cfg: ExperimentConfig, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, init_params: dict | None = None) -> TrainResult:
    """Train `cfg` from scratch (or from `init_params`, e.g. an imported checkpoint), or from
    the newest checkpoint of its run when `resume`.

    With `cfg.lora.rank` >= 1 the model's params (fresh or `init_params`) are the frozen base
    and only LoRA adapters train: checkpoints hold the adapters and their optimizer state,
    and a resume needs the same base (same `init_params`, or same model.* and train.seed).

    Metrics stay on the device between log points (eval, checkpoint, stop): there the
    losses since the last point are fetched in one transfer, checked, and written one
    line per step. `stop_after` ends this call after that step with a checkpoint, as
    SIGTERM would (for time-sliced jobs); the schedule still runs to cfg.train.steps.

    Raises:
      ConfigError: the tokenizer's vocabulary exceeds model.vocab_size, the run folder
        already has checkpoints and `resume` is False, `stop_after` is not after the step
        resumed from, or too few val windows for one eval batch the mesh can split.
      CheckpointError: `resume` without a readable checkpoint, or a LoRA checkpoint made
        on another base.
      TrainingDiverged: the loss became NaN or infinite (the checkpoint whose weights gave
        that loss is removed, so a resume starts from the last good one).
      ValueError: a LoRA target the model does not have, a rank above a target's size, or a
        pipeline whose layers or micro-batch do not split (before the run folder is made).
    """
    tc = cfg.train
    run_dir = cfg.run_dir
    data = load_dataset(cfg.data.corpus, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.val_fraction)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"at least the tokenizer's vocabulary, {data.tokenizer.vocab_size}")
    pipelined = cfg.mesh.pipeline > 1
    if pipelined and cfg.lora.rank > 0:
        raise ConfigError("lora.rank", cfg.lora.rank, "0 with mesh.pipeline > 1 (LoRA has no pipeline step yet)")
    ckpt = Checkpointer(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    if not resume and ckpt.latest_step() is not None:
        raise ConfigError("name", cfg.name, f"a new run name: {run_dir} already has checkpoints "
                          "(pass --resume to continue it)")
    if not resume and (run_dir / "metrics.jsonl").exists():  # its records would mix with this run's
        raise ConfigError("name", cfg.name, f"a new run name: {run_dir} holds a run that stopped before its "
                          "first checkpoint (metrics.jsonl); remove that folder or choose another name")

    graphdef, params = split_model(init_model(cfg.model, seed=tc.seed))
    if init_params is not None:
        params = _checked_like(init_params, params)
    lora_cfg = cfg.lora if cfg.lora.rank > 0 else None
    base = None  # the frozen params of a LoRA run
    if lora_cfg is not None:
        base, params = params, lora.init_adapters(params, lora_cfg, jax.random.key(tc.seed))
    optimizer = make_optimizer(cfg.optim, tc.steps)
    state = init_train_state(params, optimizer)
    batches = BatchIterator(data.train, tc.batch_size, seed=tc.seed)
    mesh = rules = None
    if math.prod(cfg.mesh.shape) > 1:  # sharded: lay the state out by its logical names
        mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules
        if pipelined:
            state = jax.device_put(state, pipeline_state_shardings(graphdef, state, mesh, rules))
        elif lora_cfg is None:
            state = shard_state(state, graphdef, mesh, rules)
        else:
            state_sh, base_sh = lora_shardings(graphdef, lora_cfg, state, base, mesh, rules)
            state, base = jax.device_put(state, state_sh), jax.device_put(base, base_sh)
    base_print = None if base is None else _fingerprint(base)
    if resume:
        state, meta = ckpt.restore(state)  # restores onto the template's shardings
        _check_same_base(meta.get("lora_base"), base_print, ckpt.directory)
        batches.restore(meta["data"])
    start = int(jax.device_get(state["step"]))
    if stop_after is not None and stop_after <= start:
        raise ConfigError("stop_after", stop_after, f"a step after the one resumed from, {start}")
    ways = 1 if mesh is None else batch_ways(mesh, rules)  # the pipeline's rules split the batch alike
    val_batches = _eval_batches(data.val, tc.batch_size // tc.grad_accum, tc.eval_batches, ways)
    if not val_batches:  # found now, not at the first eval
        raise ConfigError("data.val_fraction", cfg.data.val_fraction,
                          f"enough val windows for an eval batch the mesh splits {ways} ways; "
                          f"got {len(data.val)}")
    if pipelined:  # its shape checks, before the run folder exists (the step makes them at its first call)
        check_pipeline(n_layers=cfg.model.n_layers, stages=cfg.mesh.pipeline,
                       micro_batch=tc.batch_size // tc.grad_accum, microbatches=cfg.mesh.pp_microbatches,
                       batch_ways=ways)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves its folder as it was
    save_config(cfg, run_dir / "config.yaml")

    if pipelined:
        train_step = make_pipeline_train_step(graphdef, optimizer, lr_schedule(cfg.optim, tc.steps), mesh=mesh,
                                              rules=rules, microbatches=cfg.mesh.pp_microbatches,
                                              pp_schedule=cfg.mesh.pp_schedule)
        eval_step = make_eval_step(graphdef, mesh=mesh, rules=pipeline_rules(rules)[0])
    else:
        train_step = make_train_step(graphdef, optimizer, lr_schedule(cfg.optim, tc.steps), mesh=mesh,
                                     rules=rules, lora=lora_cfg)
        eval_step = make_eval_step(graphdef, mesh=mesh, rules=rules)
    frozen = () if base is None else (base,)  # the step's extra argument: never a closure constant
    if base is None:
        model_params = lambda: state["params"]
    else:
        merge = jax.jit(functools.partial(lora.merge, cfg=lora_cfg),
                        out_shardings=None if mesh is None else base_sh)
        model_params = lambda: merge(base, state["params"])
    n_params = count_params(base if base is not None else params)
    n_trainable = count_params(state["params"])
    tokens_per_step = tc.batch_size * cfg.data.seq_len
    if base is None:
        per_token = flops_per_token(cfg.model, n_params, cfg.data.seq_len)
    else:  # LoRA: the base's matmul weights are frozen (4 FLOPs a token), the adapters train (6)
        per_token = flops_per_token(cfg.model, n_params + n_trainable, cfg.data.seq_len,
                                    n_frozen=matmul_params(cfg.model, n_params))
    flops_per_step = per_token * tokens_per_step
    peak = device_peak_flops()  # one device's; the step's FLOPs are the whole mesh's
    peak = peak and peak * (1 if mesh is None else mesh.devices.size)
    print(f"{cfg.name}: {n_params / 1e6:.2f}M params, {len(data.train)} train / {len(data.val)} val "
          f"sequences of {cfg.data.seq_len} tokens, unigram entropy {data.unigram_entropy:.3f} nats/token")
    if lora_cfg is not None:
        print(f"LoRA rank {lora_cfg.rank}, alpha {lora_cfg.alpha:g} on {','.join(lora_cfg.target_names)}: "
              f"{n_trainable:,} trainable params ({100 * n_trainable / n_params:.2f}% of the base)")

    def put(host_batch):
        host_batch = host_batch.reshape(tc.grad_accum, -1, cfg.data.seq_len + 1)
        return jax.device_put(host_batch) if mesh is None else shard_batch(host_batch, mesh, rules)

    def save(step, data_position):
        meta = {"data": data_position, "step": step}
        if base_print is not None:
            meta["lora_base"] = base_print
        ckpt.save(step, state, meta)

    # A resume logs the steps after its checkpoint again: the logger drops an earlier run's records of them.
    logger = MetricsLogger(run_dir, resume_after=start if resume else None)
    pending = []  # (step, metrics on device) since the last log point

    def fetch() -> list[tuple[int, dict]]:
        """The pending steps' metrics on the host (one transfer); raises TrainingDiverged at
        the first non-finite loss, after logging the steps before it."""
        records = list(zip([s for s, _ in pending], jax.device_get([m for _, m in pending])))
        pending.clear()
        for i, (step, metrics) in enumerate(records):
            if not np.isfinite(metrics["loss"]):
                _log(logger, records[:i])
                # Step k's loss comes from the weights of step k - 1, so that checkpoint is bad too.
                dropped = ""
                if ckpt.latest_step() == step - 1:
                    ckpt.delete(step - 1)
                    dropped = f" (the checkpoint of step {step - 1}, whose weights gave this loss, is removed)"
                good = ckpt.latest_step()
                raise TrainingDiverged(f"loss is {float(metrics['loss'])} at step {step}; last good checkpoint: "
                                       + (f"step {good} in {ckpt.directory}" if good is not None else "none")
                                       + dropped)
        return records

    train_loss = val_loss = None
    stopped = False
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), start
    try:
        with _StopFlag() as stop:
            batch = put(next(batches)) if start < tc.steps else None
            for step in range(start + 1, tc.steps + 1):
                data_position = batches.state()  # after this step's batch: what a checkpoint saves
                state, metrics = train_step(state, batch, *frozen)  # dispatched; runs while we go on
                pending.append((step, metrics))
                stopping = stop.signum is not None or step == stop_after
                if step < tc.steps and not stopping:
                    batch = put(next(batches))  # the next batch travels while this step computes
                if step == start + 1:  # the first step compiles: throughput counts from its end
                    jax.block_until_ready(metrics)
                    t_last, step_last = time.perf_counter(), step
                bar.update(1)
                evaluating = step % tc.eval_every == 0 or step == tc.steps
                saving = step % tc.checkpoint_every == 0 or step == tc.steps or stopping
                if not (evaluating or saving):
                    continue
                records = fetch()  # checks the losses before any checkpoint is written
                train_loss = float(records[-1][1]["loss"])
                bar.set_postfix(loss=f"{train_loss:.3f}")
                summary = {}
                if evaluating:
                    elapsed, timed = time.perf_counter() - t_last, step - step_last
                    tok_s = timed * tokens_per_step / elapsed if timed else None
                    mfu = flops_per_step * timed / elapsed / peak if peak and timed else None
                    eval_params = model_params()
                    val_loss = float(np.mean(jax.device_get([eval_step(eval_params, jnp.asarray(b))
                                                             for b in val_batches])))
                    bar.write(f"step {step:>6} | train {train_loss:.4f} | val {val_loss:.4f}"
                              + (f" | {tok_s:,.0f} tok/s" if tok_s else "")
                              + (f" | MFU {100 * mfu:.1f}%" if mfu else ""))
                    summary = dict(val_loss=val_loss, tokens_per_s=tok_s, mfu=mfu)
                    t_last, step_last = time.perf_counter(), step  # throughput leaves out the eval
                _log(logger, records, summary)
                if saving:
                    save(step, data_position)
                if stopping:
                    why = f"signal {signal.Signals(stop.signum).name}" if stop.signum else f"stop_after={stop_after}"
                    bar.write(f"{why}: saved step {step} to {ckpt.directory}; continue with --resume")
                    stopped = True
                    break
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        logger.close()

    final_params = model_params()
    sample = None
    if tc.sample_tokens > 0 and not stopped:
        sample = sample_text(nnx.merge(graphdef, final_params), data.tokenizer, cfg, tc.sample_prompt)
        (run_dir / "samples.txt").write_text(sample)
        print(f"--- sample ({tc.sample_tokens} tokens) ---\n{sample}")
    return TrainResult(step=int(jax.device_get(state["step"])), train_loss=train_loss, val_loss=val_loss,
                       unigram_entropy=data.unigram_entropy, stopped_by_signal=stopped, sample=sample,
                       params=final_params, trainable_params=n_trainable,
                       adapters=None if base is None else state["params"])


def _log(logger: MetricsLogger, records: list[tuple[int, dict]], last_extra: dict | None = None):
    """One metrics.jsonl line per step: train_loss and the step's other metrics (arrays as
    lists); `last_extra` (val loss, throughput) joins the last line."""
    for i, (step, metrics) in enumerate(records):
        extra = last_extra if last_extra and i == len(records) - 1 else {}
        logger.log(step, train_loss=metrics["loss"], **{k: v for k, v in metrics.items() if k != "loss"}, **extra)


def _fingerprint(params: dict) -> float:
    """A cheap summary of a params tree (sum of |x|), to tell a LoRA run's base apart."""
    return float(jax.device_get(sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(params))))


def _check_same_base(saved: float | None, current: float | None, directory):
    """A LoRA checkpoint resumes only on the base it was trained on (a run with LoRA
    switched on or off already fails to restore: the state trees differ)."""
    if saved is not None and current is not None and not math.isclose(saved, current, rel_tol=1e-5):
        raise CheckpointError(f"the checkpoints in {directory} hold LoRA adapters for a base of fingerprint "
                              f"{saved:.8g}, but this run's base has {current:.8g}: resume with the same "
                              "--init-from-hf folder (or model.* and train.seed)")


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
