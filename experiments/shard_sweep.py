"""Which layout is fastest here, and how much memory each needs: `python -m experiments.shard_sweep
[--config x.yaml] --layouts dp,fsdp,tp [key=value ...]`.

For each rule preset: pick a mesh of all local devices for it, compile the train step, run
`--steps` timed steps on random tokens (train.batch_size x data.seq_len, train.grad_accum
micro-batches), and report step time, tokens/s, MFU, predicted and compiled memory per
device (params + optimizer state, and activations under model.remat), and the collective
bytes in the compiled program. Pipeline layouts `pp` (stages x dp) and `pp_fsdp` (stages x
fsdp) run `sharding.pipeline` with mesh.pp_schedule and mesh.pp_microbatches and report the
schedule's bubble. Each row also has `memory_ratio`, the memory model's bytes (params + grads +
optimizer state + activations) over the compiled program's, and `loss_vs_single`: its loss
minus that of the same step on the first device alone (dp rules, a 1-device mesh, the same
init params, batch and warm-up + --steps steps; that run holds the whole batch on one device).
The tolerance is 1e-5 relative when model.dtype and model.param_dtype are float32 (only the
order of sums differs) and 2e-2 absolute otherwise: bf16/fp16 rounding differs between
shardings because their reductions split differently, and it compounds over the steps. The
table flags a row beyond it with MISMATCH and a line under it gives the largest |difference|.
Writes runs/<name>/shard_sweep.json (rows, the single-device row, the loss check),
shard_sweep.png and config.yaml.

`--weak-scaling --layouts dp,fsdp`: for each layout, time the step (one warm-up, --steps timed)
on meshes of the first 1, 2, 4, ... devices (and all of them if their count is not a power of
two) with the batch per device fixed at train.batch_size / device count (it must divide), so
the global batch at n devices is that times n. Reports step time, tokens/s, tokens/s per device
and efficiency (tokens/s per device at n over that at 1 device, same layout; the target is
>= 90%) and memory_ratio; writes runs/<name>/weak_scaling.json and weak_scaling.png
(efficiency with the 90% line, and tokens/s per device, against the device count).

`--auto [--top K] [--spread S] [--rounds R]` searches instead (`sharding.search`): every mesh
factorization x preset x remat policy (x pipeline microbatches), pruned by predicted memory,
ranked by the cost model with constants measured on this machine (matmul rates at the model's
shape with all devices busy and one alone, in-program all-reduce latency and bandwidth). The K
best and S more spaced over the ranking are compiled, then timed in R interleaved rounds of
--steps steps each (a load change on a shared host hits all alike); the measured fastest wins.
Prints the ranking with predicted vs measured (median) step time and its spread, predicted vs
compiled collectives (loops counted per iteration) and memory, the paper's pick against the
measured best and the Spearman rank correlation; writes runs/<name>/shard_search.json and
shard_search.png (predicted vs measured step time, the correlation in the title).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, MeshConfig, load_config, save_config
from llmjax.models import count_params, init_model, split_model
from llmjax.train.flops import device_peak_flops, flops_per_token
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from sharding import search
from sharding.memory import activation_bytes, estimate_train_memory, pipeline_activation_bytes
from sharding.mesh import check_divisibility, make_mesh, mesh_shape
from sharding.pipeline import check_pipeline, make_pipeline_train_step, pipeline_rules, pipeline_state_shardings
from sharding.placement import shard_state
from sharding.rules import PRESETS

# The axis each preset spreads its model-parallel split over; the rest go to its batch axis.
_SPLIT_AXIS = {"tp": "tensor", "fsdp_tp": "tensor", "sp": "tensor", "cp": "sequence"}
_BATCH_AXIS = {"dp": "data", "fsdp": "fsdp", "zero1": "fsdp", "tp": "data", "fsdp_tp": "fsdp",
               "sp": "data", "cp": "fsdp"}
_HLO_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
              "s8": 1, "u8": 1, "pred": 1}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
PIPELINE_LAYOUTS = search.PIPELINE_PRESETS  # layout -> the preset of the other axes


def _pipeline_mesh(layout: str, n_devices: int, model_cfg, micro_batch: int, seq_len: int,
                   microbatches: int, schedule: str) -> MeshConfig:
    """The most stages (up to 8) that divide the layers and devices, the rest on the batch."""
    rules, error = PIPELINE_LAYOUTS[layout], None
    for stages in (8, 4, 2):
        if n_devices % stages or model_cfg.n_layers % stages:
            continue
        mesh_cfg = MeshConfig(rules=rules, pipeline=stages, pp_microbatches=microbatches,
                              pp_schedule=schedule, **{_BATCH_AXIS[rules]: n_devices // stages})
        try:
            check_pipeline(n_layers=model_cfg.n_layers, stages=stages, micro_batch=micro_batch,
                           microbatches=microbatches, batch_ways=n_devices // stages)
            check_divisibility(model_cfg, mesh_cfg, micro_batch // microbatches, seq_len=seq_len,
                               rules=pipeline_rules(rules)[0])
            return mesh_cfg
        except ValueError as e:
            error = e
    raise ValueError(f"{layout}: no pipeline of {n_devices} devices fits model.n_layers="
                     f"{model_cfg.n_layers}: {error or 'need at least 2 stages'}")


def mesh_for(layout: str, n_devices: int, model_cfg, micro_batch: int, seq_len: int,
             pp: tuple[str, int] = ("gpipe", 4)) -> MeshConfig:
    """The mesh of `n_devices` for a preset: the largest model-parallel split (up to 8) the
    model divides, the rest on the batch axis; pipeline layouts take `pp` = (schedule,
    microbatches).

    Raises:
      ValueError: no mesh of these devices suits the preset (the last check's message).
    """
    if layout in PIPELINE_LAYOUTS:
        return _pipeline_mesh(layout, n_devices, model_cfg, micro_batch, seq_len,
                              microbatches=pp[1], schedule=pp[0])
    if layout not in PRESETS:
        raise ValueError(f"layout {layout!r} unknown; use some of {', '.join(PRESETS)}, "
                         f"{', '.join(PIPELINE_LAYOUTS)}")
    error = None
    for split in (8, 4, 2, 1) if layout in _SPLIT_AXIS else (1,):
        if n_devices % split:
            continue
        sizes = {_BATCH_AXIS[layout]: n_devices // split}
        if layout in _SPLIT_AXIS:
            sizes[_SPLIT_AXIS[layout]] = split
        mesh_cfg = MeshConfig(rules=layout, **sizes)
        try:
            check_divisibility(model_cfg, mesh_cfg, micro_batch, seq_len=seq_len)
            return mesh_cfg
        except ValueError as e:
            error = e
    raise ValueError(f"{layout}: no mesh of {n_devices} devices fits: {error}")


def _computation_counts(hlo_text: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """HLO computations (name -> instruction lines) and how often each runs per call of
    the entry: a while body `known_trip_count` times its caller, any other callee once
    (every branch of a conditional, so a pipeline's F/B ticks give an upper bound)."""
    bodies, name, entry = {}, None, None
    for line in hlo_text.splitlines():
        head = re.match(r"(ENTRY )?%(\S+) .*\{$", line)
        if head:
            name = head.group(2)
            entry = entry or (name if head.group(1) else None)
            bodies[name] = []
        elif name is not None and line.startswith("  "):
            bodies[name].append(line)
    runs: dict[str, int] = {}

    def visit(comp, times):
        runs[comp] = runs.get(comp, 0) + times
        for line in bodies.get(comp, ()):
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for callee in re.findall(r"body=%([\w.\-]+)", line):
                visit(callee, times * (int(trips.group(1)) if trips else 1))
            called = re.findall(r"(?:to_apply|calls|true_computation|false_computation)=%([\w.\-]+)", line)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            for callee in called + (re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []):
                visit(callee, times)

    if entry:
        visit(entry, 1)
    return bodies, runs


def hlo_collectives(hlo_text: str) -> dict[str, float]:
    """Collectives one device runs per step in compiled HLO text: {"count": ops executed,
    "bytes": bytes they produce}, an op inside a loop (the layer scan, micro-batches,
    pipeline ticks) counted once per iteration (its `known_trip_count`)."""
    op = re.compile(r"= (.*?) (?:" + "|".join(_COLLECTIVES) + r")(-start)?\(")
    bodies, runs = _computation_counts(hlo_text)
    count = nbytes = 0
    for comp, lines in bodies.items():
        for line in lines:
            match = op.search(line)
            if match is None:
                continue
            shapes = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))  # one per output (tuples: many)
            if match.group(2):  # an async start returns (operands, results): keep the results
                shapes = shapes[len(shapes) // 2:]
            count += runs.get(comp, 0)
            nbytes += runs.get(comp, 0) * sum(math.prod(int(d) for d in dims.split(",") if d) *
                                              _HLO_BYTES.get(dtype, 4) for dtype, dims in shapes)
    return {"count": count, "bytes": nbytes}


def compiled_bytes(mem) -> int:
    """Peak bytes per device of a compiled step from its `memory_analysis()`: arguments,
    outputs and temporaries, less the outputs that reuse donated arguments."""
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)


@dataclasses.dataclass
class _Job:
    """One compiled layout being timed: its step, live state, batch, and the row so far."""

    compiled: object
    state: dict
    batch: jax.Array
    row: dict
    times: list = dataclasses.field(default_factory=list)
    metrics: dict | None = None

    def run(self, steps: int):
        """Run `steps` steps, recording each one's wall time."""
        for _ in range(steps):
            t0 = time.perf_counter()
            self.state, self.metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready(self.metrics)
            self.times.append(time.perf_counter() - t0)


def compile_layout(cfg, layout: str, graphdef, params, optimizer, mesh_cfg: MeshConfig | None = None,
                   name: str | None = None, devices=None) -> _Job:
    """Shard the state and compile the train step of one layout (on `mesh_cfg`, default
    `mesh_for`'s) over `devices` (default: all), with its predicted and compiled memory and
    compiled collectives. `graphdef` is built from cfg.model (its remat policy)."""
    devices = list(jax.devices() if devices is None else devices)
    tc, seq_len, n = cfg.train, cfg.data.seq_len, len(devices)
    micro_batch = tc.batch_size // tc.grad_accum
    if mesh_cfg is None:
        mesh_cfg = mesh_for(layout, n, cfg.model, micro_batch, seq_len,
                            (cfg.mesh.pp_schedule, cfg.mesh.pp_microbatches))
    pp = (mesh_cfg.pp_schedule, mesh_cfg.pp_microbatches)
    remat = cfg.model.remat
    mesh = make_mesh(mesh_cfg, devices)
    state = init_train_state(jax.tree.map(jnp.array, params), optimizer)
    batch = jax.random.randint(jax.random.key(0), (tc.grad_accum, micro_batch, seq_len + 1),
                               0, cfg.model.vocab_size, dtype=jnp.int32)
    if mesh_cfg.pipeline > 1:
        rules = pipeline_rules(mesh_cfg.rules)[0]  # the same table for params and opt state
        state = jax.device_put(state, pipeline_state_shardings(graphdef, state, mesh, mesh_cfg.rules))
        step = make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules=mesh_cfg.rules,
                                        microbatches=pp[1], pp_schedule=pp[0])
        bubble = step.stats["bubble"]
        activations = pipeline_activation_bytes(
            cfg.model, mesh_shape(mesh_cfg), rules, micro_batch=micro_batch // pp[1], seq_len=seq_len,
            in_flight=step.stats["max_in_flight"], remat=remat)
    else:
        rules, bubble = mesh_cfg.rules, None
        state = shard_state(state, graphdef, mesh, rules)
        step = make_train_step(graphdef, optimizer, mesh=mesh, rules=rules)
        activations = activation_bytes(cfg.model, mesh_shape(mesh_cfg), rules, micro_batch=micro_batch,
                                       seq_len=seq_len, remat=remat)
    predicted = estimate_train_memory(graphdef, state, mesh, rules)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    collectives = hlo_collectives(compiled.as_text())
    if name is None:
        name = f"{layout}/{pp[0]}/m{pp[1]}" if bubble is not None else layout
    row = {"layout": name, "mesh": {axis: size for axis, size in mesh_shape(mesh_cfg).items() if size != 1},
           "n_devices": n, "compile_s": compile_s, "predicted_params_opt_bytes": predicted.params_and_opt,
           "predicted_total_bytes": predicted.total, "predicted_activation_bytes": activations, "bubble": bubble,
           "compiled_argument_bytes": mem.argument_size_in_bytes, "compiled_temp_bytes": mem.temp_size_in_bytes,
           "compiled_bytes": compiled_bytes(mem),
           # The memory model against the compiled program: (params + grads + optimizer state
           # + activations) / (arguments + outputs + temp - aliased).
           "memory_ratio": (predicted.total + activations) / compiled_bytes(mem),
           "collective_bytes": collectives["bytes"], "collective_count": collectives["count"]}
    return _Job(compiled, state, batch, row)


def finish_row(job: _Job, cfg, n_params: int) -> dict:
    """The job's row with its timing: the median step (warm-up excluded), tokens/s, MFU, loss."""
    step_s = statistics.median(job.times[1:])
    tokens_s = cfg.train.batch_size * cfg.data.seq_len / step_s
    peak = device_peak_flops()
    flops = flops_per_token(cfg.model, n_params, cfg.data.seq_len) * tokens_s
    return {**job.row, "step_s": step_s, "tokens_per_s": tokens_s,
            "mfu": flops / (peak * job.row["n_devices"]) if peak else None, "loss": float(job.metrics["loss"])}


def sweep_one(cfg, layout: str, graphdef, params, optimizer, steps: int,
              mesh_cfg: MeshConfig | None = None, name: str | None = None, devices=None) -> dict:
    """Compile and time one layout on `devices` (default: all) (`compile_layout`, then one
    warm-up and `steps` timed steps); a row of the table."""
    job = compile_layout(cfg, layout, graphdef, params, optimizer, mesh_cfg, name, devices)
    job.run(steps + 1)
    return finish_row(job, cfg, count_params(params))


# Loss against the single-device run (after the same steps): float32 compute differs only in
# the order of sums, so 1e-5 relative; bfloat16/float16 round differently when a sharding
# splits a reduction (and the rounding then feeds the updates), so 2e-2 absolute.
LOSS_RTOL_FP32 = 1e-5
LOSS_ATOL_LOW_PRECISION = 2e-2


def loss_tolerance(model_cfg, reference_loss: float) -> tuple[float, str]:
    """(absolute tolerance on loss - single-device loss, how it was chosen): 1e-5 relative
    when model.dtype and model.param_dtype are float32, else 2e-2 absolute."""
    if model_cfg.dtype == "float32" and model_cfg.param_dtype == "float32":
        return LOSS_RTOL_FP32 * abs(reference_loss), f"{LOSS_RTOL_FP32:g} relative (float32)"
    return LOSS_ATOL_LOW_PRECISION, f"{LOSS_ATOL_LOW_PRECISION:g} absolute (model.dtype={model_cfg.dtype})"


def single_device_reference(cfg, graphdef, params, optimizer, steps: int) -> dict:
    """The same train step (dp rules) on a mesh of the first device alone, from the same
    params on the same batch for the same steps as `sweep_one`: the loss every layout must
    reproduce. It holds the whole global batch on one device."""
    return sweep_one(cfg, "dp", graphdef, params, optimizer, steps, mesh_cfg=MeshConfig(rules="dp"),
                     name="dp (1 device)", devices=jax.devices()[:1])


def compare_losses(rows: list[dict], reference: dict, model_cfg) -> dict:
    """Add `loss_vs_single` (row loss - reference loss) to every row; returns the summary
    {tolerance, tolerance_rule, max_abs_loss_vs_single, mismatched: [layouts beyond it]}."""
    tol, rule = loss_tolerance(model_cfg, reference["loss"])
    for r in rows:
        r["loss_vs_single"] = r["loss"] - reference["loss"]
    worst = max((abs(r["loss_vs_single"]) for r in rows), default=0.0)
    return {"tolerance": tol, "tolerance_rule": rule, "max_abs_loss_vs_single": worst,
            "mismatched": [r["layout"] for r in rows if abs(r["loss_vs_single"]) > tol]}


def _mesh_label(row: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in row["mesh"].items()) or "1 device"


def format_table(rows: list[dict], tolerance: float | None = None) -> str:
    """The printed table: one line per layout (memory in MiB per device), its loss minus the
    single-device loss and the memory model's ratio to the compiled bytes; rows whose loss
    is off by more than `tolerance` end in MISMATCH."""
    head = (f"{'layout':<16} {'mesh':<22} {'step ms':>8} {'tok/s':>9} {'MFU':>6} {'pred MiB':>9} "
            f"{'args MiB':>9} {'act MiB':>9} {'temp MiB':>9} {'coll MiB':>9} {'loss-1dev':>9} "
            f"{'mem ratio':>9} {'bubble':>6}")
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    lines = [head]
    for r in rows:
        mesh = _mesh_label(r)
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6}"
        bubble = f"{r['bubble']:6.1%}" if r["bubble"] is not None else f"{'-':>6}"
        diff = r.get("loss_vs_single")
        flag = " MISMATCH" if diff is not None and tolerance is not None and abs(diff) > tolerance else ""
        lines.append(f"{r['layout']:<16} {mesh:<22} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} {mfu} "
                     f"{mib(r['predicted_params_opt_bytes'])} {mib(r['compiled_argument_bytes'])} "
                     f"{mib(r['predicted_activation_bytes'])} {mib(r['compiled_temp_bytes'])} "
                     f"{mib(r['collective_bytes'])} {'-' if diff is None else f'{diff:+.2e}':>9} "
                     f"{r['memory_ratio']:9.3f} {bubble}{flag}")
    return "\n".join(lines)


WEAK_SCALING_TARGET = 0.9  # efficiency the issue asks of dp and fsdp at every device count


def weak_scaling_sizes(n_devices: int) -> list[int]:
    """1, 2, 4, ... up to `n_devices`, and `n_devices` itself if not a power of two."""
    sizes = [2**k for k in range(n_devices.bit_length()) if 2**k <= n_devices]
    return sizes + ([n_devices] if sizes[-1] != n_devices else [])


def per_device_batch(train_cfg, n_devices: int) -> int:
    """train.batch_size (the global batch at all `n_devices`) / n_devices.

    Raises:
      ValueError: the batch does not divide by the device count, or the per-device batch
        not by train.grad_accum (each device's share of a micro-batch must be whole).
    """
    b, accum = divmod(train_cfg.batch_size, n_devices), train_cfg.grad_accum
    if b[1] or not b[0]:
        fits = n_devices * max(1, round(train_cfg.batch_size / n_devices))
        raise ValueError(f"--weak-scaling holds the batch per device fixed: train.batch_size="
                         f"{train_cfg.batch_size} (the global batch at all {n_devices} devices) must be a "
                         f"multiple of the device count {n_devices}; use e.g. train.batch_size={fits}")
    if b[0] % accum:
        raise ValueError(f"--weak-scaling: the batch per device, train.batch_size={train_cfg.batch_size} / "
                         f"{n_devices} devices = {b[0]}, is not divisible by train.grad_accum={accum}")
    return b[0]


def weak_scaling(cfg, layouts: list[str], steps: int, devices=None) -> list[dict]:
    """Weak scaling of each layout: for n in `weak_scaling_sizes`, time the train step
    (`sweep_one`) on a mesh of the first n of `devices` (default: all) with the batch per
    device held at train.batch_size / len(devices), so the global batch is that times n.
    Each row adds n_devices, global_batch, tokens_per_s_per_device and efficiency: tokens/s
    per device at n over the same at n = 1 for the same layout.

    Raises:
      ValueError: as `per_device_batch`, or no mesh of some n devices suits a layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    b = per_device_batch(cfg.train, len(devices))
    graphdef, params = split_model(init_model(cfg.model, seed=cfg.train.seed))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    # The sweep picks its own meshes: drop any mesh sizes given, keep the pipeline settings.
    mesh = MeshConfig(pp_schedule=cfg.mesh.pp_schedule, pp_microbatches=cfg.mesh.pp_microbatches)
    rows = []
    for layout in layouts:
        mine = []
        for n in weak_scaling_sizes(len(devices)):
            cfg_n = dataclasses.replace(cfg, mesh=mesh, train=dataclasses.replace(cfg.train, batch_size=b * n))
            row = sweep_one(cfg_n, layout, graphdef, params, optimizer, steps, devices=devices[:n])
            mine.append({**row, "global_batch": b * n, "tokens_per_s_per_device": row["tokens_per_s"] / n})
        base = mine[0]["tokens_per_s_per_device"]  # n = 1
        rows += [{**r, "efficiency": r["tokens_per_s_per_device"] / base} for r in mine]
    return rows


def format_weak_scaling(rows: list[dict]) -> str:
    """The printed weak-scaling table, then each layout's lowest efficiency against the target."""
    lines = [f"{'layout':<16} {'devices':>7} {'mesh':<22} {'batch':>6} {'step ms':>8} {'tok/s':>10} "
             f"{'tok/s/dev':>10} {'efficiency':>10} {'mem ratio':>9}"]
    for r in rows:
        mesh = _mesh_label(r)
        lines.append(f"{r['layout']:<16} {r['n_devices']:>7} {mesh:<22} {r['global_batch']:>6} "
                     f"{r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:10.0f} {r['tokens_per_s_per_device']:10.0f} "
                     f"{r['efficiency']:10.1%} {r['memory_ratio']:9.3f}")
    for layout in dict.fromkeys(r["layout"] for r in rows):
        low = min((r for r in rows if r["layout"] == layout), key=lambda r: r["efficiency"])
        verdict = "meets" if low["efficiency"] >= WEAK_SCALING_TARGET else "BELOW"
        lines.append(f"{layout}: lowest efficiency {low['efficiency']:.1%} at {low['n_devices']} devices "
                     f"({verdict} the {WEAK_SCALING_TARGET:.0%} target)")
    return "\n".join(lines)


def plot_weak_scaling(rows: list[dict], path, title: str):
    """Efficiency (with the target line) and tokens/s per device against the device count,
    one line per layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layout in dict.fromkeys(r["layout"] for r in rows):
        mine = [r for r in rows if r["layout"] == layout]
        ns = [r["n_devices"] for r in mine]
        axes[0].plot(ns, [r["efficiency"] * 100 for r in mine], "o-", label=layout)
        axes[1].plot(ns, [r["tokens_per_s_per_device"] for r in mine], "o-", label=layout)
    axes[0].axhline(WEAK_SCALING_TARGET * 100, color="gray", ls="--", label=f"{WEAK_SCALING_TARGET:.0%} target")
    axes[0].set_ylabel("efficiency (% of tokens/s per device at 1)")
    axes[1].set_ylabel("tokens/s per device")
    ns = sorted({r["n_devices"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("devices (batch per device fixed)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows: list[dict], path, title: str):
    """Step time, tokens/s, predicted vs compiled memory (params + optimizer state, and
    activations vs temp) per layout, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].bar(x, [r["step_s"] * 1e3 for r in rows])
    axes[0].set_ylabel("step time (ms)")
    axes[1].bar(x, [r["tokens_per_s"] for r in rows])
    axes[1].set_ylabel("tokens/s")
    for offset, key, label in ((-0.2, "predicted_params_opt_bytes", "predicted params+opt"),
                               (0.2, "compiled_argument_bytes", "compiled arguments")):
        axes[2].bar(x + offset, [r[key] / 2**20 for r in rows], width=0.4, label=label)
    for offset, key, label in ((-0.2, "predicted_activation_bytes", "predicted activations"),
                               (0.2, "compiled_temp_bytes", "compiled temp (+ grads, workspace)")):
        axes[3].bar(x + offset, [r[key] / 2**20 for r in rows], width=0.4, label=label)
    for ax in axes[2:]:
        ax.set_ylabel("MiB per device")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_memory_bytes() -> float:
    """Memory of one device: its allocator limit where it reports one (GPU), else this
    host's RAM shared by the local devices."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()


def auto_search(cfg, args) -> dict:
    """Rank every layout on paper (`sharding.search`) with this machine's measured rates,
    compile the `args.top` best (and `args.spread` more across the ranking), time them in
    `args.rounds` interleaved rounds of `args.steps` steps (so a load change on the host
    hits every layout alike; all timed layouts' states are live at once), and pick the
    measured fastest. Returns the JSON record."""
    tc, seq_len, n = cfg.train, cfg.data.seq_len, jax.device_count()
    memory = args.memory_gb * 1e9 if args.memory_gb else device_memory_bytes()
    _, params = split_model(init_model(cfg.model, seed=cfg.train.seed))
    n_params = count_params(params)
    # Calibrate on the model's own feed-forward matmul: [tokens per device, d_model] x [d_model, d_mlp].
    tokens = max(tc.batch_size // tc.grad_accum * seq_len // n, 1)
    hw = search.measure_hardware(memory, mfu=args.mfu, matmul_shape=(tokens, cfg.model.d_model, cfg.model.d_mlp))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops()  # datasheet; None on CPU
    if peak:
        hw = dataclasses.replace(hw, peak_flops=peak, solo_flops=None)
    if args.link_gbps:
        hw = dataclasses.replace(hw, link_bytes_per_s=args.link_gbps * 1e9)
    layer_tensors = len(jax.tree.leaves(params["blocks"]))
    ranked, pruned = search.search(cfg.model, n_params, n, hw, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                                   seq_len=seq_len, layer_tensors=layer_tensors, presets=args.presets.split(","),
                                   remats=args.remats.split(","), schedule=cfg.mesh.pp_schedule)
    if not ranked:
        raise ValueError(f"no layout of {n} devices fits {memory / 1e9:.2f} GB per device "
                         f"({len(pruned)} pruned); raise --memory-gb or use more devices")
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    preds, jobs = search.to_time(ranked, args.top, args.spread), []
    for pred in preds:
        layout = pred.layout
        run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=layout.remat))
        graphdef, _ = split_model(init_model(run_cfg.model, seed=cfg.train.seed))
        mesh_cfg = MeshConfig(rules=layout.rules, pp_microbatches=layout.microbatches,
                              pp_schedule=layout.schedule, **dict(layout.sizes))
        jobs.append(compile_layout(run_cfg, layout.preset, graphdef, params, optimizer, mesh_cfg, layout.name))
        jobs[-1].run(1)  # warm-up, not counted
    for _ in range(args.rounds):
        for job in jobs:
            job.run(args.steps)
    rows = []
    for pred, job in zip(preds, jobs):
        q25, q75 = np.percentile(job.times[1:], [25, 75])
        rows.append({**finish_row(job, cfg, n_params), "step_q25_s": q25, "step_q75_s": q75,
                     "predicted_step_s": pred.step_s,
                     "predicted_compute_s": pred.compute_s, "predicted_comm_s": pred.comm_s,
                     "predicted_comm_ops": pred.comm_ops, "predicted_bytes": pred.memory_bytes})
    winner = search.choose({r["layout"]: r["step_s"] for r in rows})
    best = min(r["step_s"] for r in rows)
    rho = search.rank_correlation([r["predicted_step_s"] for r in rows], [r["step_s"] for r in rows])
    ranking = [{"rank": i + 1, "layout": p.layout.name, "predicted_step_s": p.step_s,
                "predicted_compute_s": p.compute_s, "predicted_comm_s": p.comm_s, "bubble": p.bubble,
                "predicted_comm_bytes": p.comm_bytes, "predicted_comm_ops": p.comm_ops,
                "predicted_bytes": p.memory_bytes} for i, p in enumerate(ranked)]
    # The MFU that makes each timed prediction exact (compute scaled, communication kept):
    # what to pass as --mfu next time on this machine.
    fitted = [hw.mfu * r["predicted_compute_s"] / (r["step_s"] - r["predicted_comm_s"])
              for r in rows if r["step_s"] > r["predicted_comm_s"]]
    return {"hardware": dataclasses.asdict(hw), "n_params": n_params, "layer_tensors": layer_tensors,
            "ranking": ranking, "mfu_fitted": statistics.median(fitted) if fitted else None,
            "pruned": [{"layout": p.layout.name, "predicted_bytes": p.memory_bytes} for p in pruned],
            "rows": rows, "winner": winner, "rank_correlation": rho,
            # The cost model's own pick (best on paper) against the measured best: the check
            # that the ranking, not just the timing, finds a fast layout.
            "paper_pick": rows[0]["layout"], "paper_pick_vs_best": rows[0]["step_s"] / best}


def format_auto(record: dict, shown: int = 20) -> str:
    """The printed ranking: predicted step time, collectives and memory of the best `shown`
    and the timed ones (with their measured median step time and its spread, compiled
    collectives and memory), the winner, the paper's pick against the measured best, and the
    rank correlation."""
    timed = {r["layout"]: r for r in record["rows"]}
    hw = record["hardware"]
    solo = f" ({hw['solo_flops'] / 1e9:.1f} alone)" if hw["solo_flops"] else ""
    lines = [f"cost model: {hw['peak_flops'] / 1e9:.1f} GFLOP/s{solo} x MFU {hw['mfu']:.2f} per device, link "
             f"{hw['link_bytes_per_s'] / 1e9:.3f} GB/s + {hw['link_latency_s'] * 1e6:.0f} us per collective, "
             f"memory {hw['memory_bytes'] / 2**30:.1f} GiB per device",
             f"{len(record['ranking'])} layouts fit, {len(record['pruned'])} pruned by memory",
             f"{'rank':>4} {'layout':<44} {'pred ms':>8} {'meas ms':>8} {'iqr':>5} {'pred coll':>9} "
             f"{'hlo coll':>8} {'pred MiB':>9} {'comp MiB':>9}"]
    for r in (r for i, r in enumerate(record["ranking"]) if i < shown or r["layout"] in timed):
        m = timed.get(r["layout"])
        iqr = (m["step_q75_s"] - m["step_q25_s"]) / m["step_s"] if m else 0
        meas = (f"{m['step_s'] * 1e3:8.1f} {iqr:5.0%} {r['predicted_comm_ops']:9.0f} "
                f"{m['collective_count']:8d} {r['predicted_bytes'] / 2**20:9.2f} {m['compiled_bytes'] / 2**20:9.2f}"
                if m else f"{'-':>8} {'-':>5} {r['predicted_comm_ops']:9.0f} {'-':>8} "
                          f"{r['predicted_bytes'] / 2**20:9.2f} {'-':>9}")
        lines.append(f"{r['rank']:>4} {r['layout']:<44} {r['predicted_step_s'] * 1e3:8.2f} {meas}")
    best = min(record["rows"], key=lambda r: r["step_s"])
    lines.append(f"winner: {record['winner']} ({best['step_s'] * 1e3:.1f} ms measured); best on paper: "
                 f"{record['paper_pick']} at {record['paper_pick_vs_best']:.2f}x the measured best")
    lines.append(f"rank correlation predicted vs measured over {len(record['rows'])} timed: "
                 f"{record['rank_correlation']:.2f}")
    if record["mfu_fitted"] is not None:
        lines.append(f"MFU that fits the measured steps (median): {record['mfu_fitted']:.3f} (given {hw['mfu']:.2f})")
    return "\n".join(lines)


def plot_auto(record: dict, path, title: str):
    """Predicted vs measured step time of the timed layouts (bars: the middle half of the
    measured steps), with the rank correlation and the paper's pick against the best."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs, ys = [r["predicted_step_s"] * 1e3 for r in rows], [r["step_s"] * 1e3 for r in rows]
    below, above = [[abs(r["step_s"] - r[q]) * 1e3 for r in rows] for q in ("step_q25_s", "step_q75_s")]
    ax.errorbar(xs, ys, yerr=[below, above], fmt="o", capsize=3)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["layout"], (x, y), fontsize=6, alpha=0.8)
    ax.set_xlabel("predicted step time (ms)")
    ax.set_ylabel("measured step time, median (ms)")
    ax.set_title(f"{title}\nSpearman rank correlation {record['rank_correlation']:.2f} over {len(rows)} layouts; "
                 f"best on paper at {record['paper_pick_vs_best']:.2f}x the measured best", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.shard_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML experiment file")
    parser.add_argument("--layouts", default="dp,fsdp,zero1,tp,fsdp_tp,sp,cp", help="comma-separated presets")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per layout (after one warm-up); --auto: per layout per round")
    parser.add_argument("--rounds", type=int, default=10, help="--auto: interleaved timing rounds")
    parser.add_argument("--weak-scaling", action="store_true",
                        help="time each of --layouts on the first 1, 2, 4, ... devices, batch per device "
                             "fixed at train.batch_size / device count")
    parser.add_argument("--auto", action="store_true",
                        help="search layouts (sharding.search): rank on paper, time the --top best")
    parser.add_argument("--top", type=int, default=4, help="--auto: layouts to compile and time")
    parser.add_argument("--spread", type=int, default=0,
                        help="--auto: also time this many layouts spaced over the rest of the ranking")
    parser.add_argument("--presets", default=",".join(search.PRESETS), help="--auto: presets to search")
    parser.add_argument("--remats", default=",".join(search.REMATS), help="--auto: remat policies to search")
    parser.add_argument("--mfu", type=float, default=0.5, help="--auto: fraction of the measured matmul rate")
    parser.add_argument("--peak-tflops", type=float,
                        help="--auto: per-device peak (default: the datasheet's, else a measured matmul)")
    parser.add_argument("--link-gbps", type=float, help="--auto: link GB/s instead of measuring it")
    parser.add_argument("--memory-gb", type=float, help="--auto: memory per device (default: the device's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.top < 1 or args.spread < 0 or args.steps < 1 or args.rounds < 1 or not 0 < args.mfu <= 1:
        parser.error(f"--top {args.top}, --steps {args.steps} and --rounds {args.rounds} must be >= 1, "
                     f"--spread {args.spread} >= 0 and --mfu {args.mfu} in (0, 1]")
    if args.auto and args.weak_scaling:
        parser.error("--auto and --weak-scaling are separate runs; pass one")
    if args.auto:
        return main_auto(args)
    if args.weak_scaling:
        return main_weak_scaling(args)
    try:
        cfg = load_config(args.config, args.overrides)
        graphdef, params = split_model(init_model(cfg.model, seed=cfg.train.seed))
        optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        reference = single_device_reference(cfg, graphdef, params, optimizer, args.steps)
        rows = [sweep_one(cfg, layout, graphdef, params, optimizer, args.steps)
                for layout in args.layouts.split(",")]
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    check = compare_losses(rows, reference, cfg.model)
    device = _write_result(cfg, "shard_sweep", {"rows": rows, "single_device": reference, "loss_check": check})
    plot(rows, cfg.run_dir / "shard_sweep.png", f"{cfg.name}: {device}")
    mismatched = f"; MISMATCH: {', '.join(check['mismatched'])}" if check["mismatched"] else ""
    print(f"{cfg.name} on {device}\n{format_table(rows, check['tolerance'])}\n"
          f"loss vs 1 device ({reference['loss']:.6f} after {args.steps + 1} steps): largest |difference| "
          f"{check['max_abs_loss_vs_single']:.2e}, tolerance {check['tolerance']:.2e} "
          f"({check['tolerance_rule']}){mismatched}\nwrote {cfg.run_dir}/shard_sweep.{{json,png}}")
    return 0


def main_weak_scaling(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        rows = weak_scaling(cfg, args.layouts.split(","), args.steps)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = _write_result(cfg, "weak_scaling", {"target_efficiency": WEAK_SCALING_TARGET, "rows": rows})
    plot_weak_scaling(rows, cfg.run_dir / "weak_scaling.png", f"{cfg.name}: weak scaling on {device}")
    print(f"{cfg.name} on {device}\n{format_weak_scaling(rows)}\nwrote {cfg.run_dir}/weak_scaling.{{json,png}}")
    return 0


def _write_result(cfg, stem: str, payload: dict) -> str:
    """Write the run's config.yaml and <stem>.json (device, jax, date + payload); returns the
    device description for titles."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    (cfg.run_dir / f"{stem}.json").write_text(json.dumps(
        {"device": device, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), **payload}, indent=1))
    return device


def main_auto(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        record = auto_search(cfg, args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = _write_result(cfg, "shard_search", record)
    plot_auto(record, cfg.run_dir / "shard_search.png", f"{cfg.name}: {device}")
    print(f"{cfg.name} on {device}\n{format_auto(record)}\nwrote {cfg.run_dir}/shard_search.{{json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
