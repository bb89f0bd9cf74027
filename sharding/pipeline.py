"""Pipeline parallelism over the stacked layer axis: GPipe and 1F1B with shard_map + ppermute.

Stage s of the `pipeline` mesh axis holds layers [s·L/p, (s+1)·L/p) of the stacked block
state (the `layers` dim of every block param is split over `pipeline`); the embedding runs
on stage 0 and the final norm + head loss on stage p-1. The other mesh axes keep the rule
preset's layout (dp, fsdp, ...): `shard_map` is manual over `pipeline` only, GSPMD
partitions the rest inside each stage.

Both schedules run one program: a static timetable of ticks (from `timetable`), in which
every stage does one forward (F), one backward (B) or nothing, then passes activations to
stage s+1 and input-gradients to stage s-1 with `ppermute`. The backward of a stage is an
explicit `jax.vjp` of that stage's function, recomputed from the stage input kept since its
forward (stage-level rematerialization), so what a stage holds between F(j) and B(j) is
one [micro, T, D] input per microbatch in flight:
  GPipe (Huang et al. 2019): all m forwards, then all m backwards: m inputs in flight.
  1F1B (PipeDream-Flush, Narayanan et al. 2021, section 2.2): stage s runs p-s-1 warm-up
    forwards, then alternates F and B: at most p - s inputs in flight.
Both idle (p-1)/(m+p-1) of their slots when F and B take one tick each (`schedule_stats`).

M microbatches per pipeline pass, p stages, L layers, B micro-batch, T length, D d_model.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding.axes import ACT_EMBED, BATCH, LAYERS, LENGTH
from sharding.placement import ShardedStep, batch_ways, constrain, state_shardings_from_tables
from sharding.rules import Rules, mesh_axes_of, resolve_rules

SCHEDULES = ("gpipe", "1f1b")
_IDLE, _FWD, _BWD = 0, 1, 2
AXIS = "pipeline"
_UNSUPPORTED_AXES = ("expert", "sequence", "tensor")


# ---------------------------------------------------------------------------------------
# The timetable: which stage does what at each tick.

def _stage_order(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple[int, int]]:
    """The (op, microbatch) sequence one stage runs, in order."""
    fwd = [(_FWD, j) for j in range(microbatches)]
    bwd = [(_BWD, j) for j in range(microbatches)]
    if schedule == "gpipe":
        return fwd + bwd
    warmup = min(stages - stage - 1, microbatches)
    order = fwd[:warmup]
    for j in range(microbatches - warmup):  # steady state: one forward, one backward
        order += [fwd[warmup + j], bwd[j]]
    return order + bwd[microbatches - warmup:]


@dataclasses.dataclass(frozen=True)
class Timetable:
    """A schedule laid out in ticks. ops/micro: [ticks, stages] (op code, microbatch);
    recv_act / recv_grad: [ticks, stages] microbatch whose activation (from stage s-1) or
    input gradient (from stage s+1) arrives at the end of the tick, -1 for none;
    act_slots / grad_slots: buffer sizes that hold every microbatch in flight."""

    ops: np.ndarray
    micro: np.ndarray
    recv_act: np.ndarray
    recv_grad: np.ndarray
    act_slots: int
    grad_slots: int


def _peak_live(arrive: np.ndarray, leave: np.ndarray) -> int:
    """Most microbatches held at once; one is held from the end of tick `arrive` through
    tick `leave` (its slot is free for a write at the end of tick `leave`)."""
    ends = range(int(arrive.max()) + 1) if arrive.size else ()
    return max([1] + [int(np.sum((arrive <= t) & (t < leave))) for t in ends])


def timetable(schedule: str, stages: int, microbatches: int) -> Timetable:
    """Simulate `schedule` tick by tick: a stage runs its next op as soon as its inputs
    arrived in an earlier tick (F(j) needs F(j) of stage s-1; B(j) needs F(j) here and
    B(j) of stage s+1).

    Raises:
      ValueError: unknown schedule, or stages / microbatches below 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"mesh.pp_schedule={schedule!r} is not a pipeline schedule; use one of "
                         f"{', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1:
        raise ValueError(f"pipeline stages={stages} and mesh.pp_microbatches={microbatches} must be >= 1")
    p, m = stages, microbatches
    orders = [_stage_order(schedule, s, p, m) for s in range(p)]
    done = {}  # (op, stage, microbatch) -> tick
    ops, micro, tick = [], [], 0
    while any(orders):
        row_ops, row_micro = [_IDLE] * p, [-1] * p
        for s in range(p):
            if not orders[s]:
                continue
            op, j = orders[s][0]
            needs = ([(_FWD, s - 1, j)] if s > 0 else []) if op == _FWD else \
                [(_FWD, s, j)] + ([(_BWD, s + 1, j)] if s < p - 1 else [])
            if all(done.get(n, tick) < tick for n in needs):
                row_ops[s], row_micro[s] = op, j
        for s in range(p):
            if row_ops[s] != _IDLE:
                done[(row_ops[s], s, row_micro[s])] = tick
                orders[s].pop(0)
        ops.append(row_ops), micro.append(row_micro)
        tick += 1
    ops, micro = np.array(ops, np.int32), np.array(micro, np.int32)
    recv_act, recv_grad = np.full_like(micro, -1), np.full_like(micro, -1)
    recv_act[:, 1:] = np.where(ops[:, :-1] == _FWD, micro[:, :-1], -1)
    recv_grad[:, :-1] = np.where(ops[:, 1:] == _BWD, micro[:, 1:], -1)
    fwd_at = np.array([[done[(_FWD, s, j)] for j in range(m)] for s in range(p)])
    bwd_at = np.array([[done[(_BWD, s, j)] for j in range(m)] for s in range(p)])
    act_slots = max(_peak_live(fwd_at[s - 1], bwd_at[s]) for s in range(1, p)) if p > 1 else 1
    grad_slots = max(_peak_live(bwd_at[s + 1], bwd_at[s]) for s in range(p - 1)) if p > 1 else 1
    return Timetable(ops, micro, recv_act, recv_grad, act_slots, grad_slots)


def schedule_stats(schedule: str, stages: int, microbatches: int) -> dict:
    """What the schedule executes: ticks, bubble (idle fraction of stage x tick slots,
    F and B one tick each), the textbook (p-1)/(m+p-1), and the most stage inputs one stage
    holds at once (the activation memory 1F1B saves: m for GPipe, <= p for 1F1B)."""
    table = timetable(schedule, stages, microbatches)
    ticks = table.ops.shape[0]
    in_flight = [_peak_live(np.array([_tick(table, _FWD, s, j) for j in range(microbatches)]),
                            np.array([_tick(table, _BWD, s, j) for j in range(microbatches)]))
                 for s in range(stages)]
    return {"schedule": schedule, "stages": stages, "microbatches": microbatches, "ticks": ticks,
            "bubble": float(np.mean(table.ops == _IDLE)),
            "ideal_bubble": (stages - 1) / (microbatches + stages - 1),
            "max_in_flight": max(in_flight)}


def _tick(table: Timetable, op: int, stage: int, micro: int) -> int:
    return int(np.flatnonzero((table.ops[:, stage] == op) & (table.micro[:, stage] == micro))[0])


# ---------------------------------------------------------------------------------------
# Layout: the preset's rules with the stacked `layers` dim split over `pipeline`.

def pipeline_rules(rules: str | Rules) -> tuple[Rules, Rules]:
    """(param rules, optimizer-state rules) of a preset or table, with `layers` -> pipeline.

    Raises:
      ValueError: unknown preset, invalid table, or rules that already use `pipeline`.
    """
    tables = []
    for table in resolve_rules(rules):
        used = [name for name, axes in table if AXIS in mesh_axes_of(axes)]
        if used and used != [LAYERS]:
            raise ValueError(f"rules {rules!r} split {used} over mesh axis {AXIS!r}; pipeline "
                             f"parallelism needs it for the layer stages alone")
        tables.append(tuple((name, AXIS if name == LAYERS else axes) for name, axes in table))
    return tables[0], tables[1]


def pipeline_state_shardings(graphdef, state: dict, mesh, rules: str | Rules) -> dict:
    """NamedShardings of a train state {"params", "opt_state", "step"} for the pipeline
    step: every block param's layer dim over `pipeline`, the rest as the rules say."""
    return state_shardings_from_tables(graphdef, state, mesh, *pipeline_rules(rules))


def check_pipeline(*, n_layers: int, stages: int, micro_batch: int, microbatches: int,
                   batch_ways: int = 1) -> None:
    """Check that layers split into equal stages and the micro-batch into equal microbatches.

    Raises:
      ValueError: naming the config key, its value and the values that would work.
    """
    if n_layers % stages:
        fits = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
        raise ValueError(f"model.n_layers={n_layers} is not divisible by mesh.pipeline={stages} "
                         f"(each stage holds n_layers / pipeline layers); use mesh.pipeline in {fits}")
    if microbatches < 1 or micro_batch % microbatches:
        fits = [d for d in range(1, micro_batch + 1) if micro_batch % d == 0]
        raise ValueError(f"mesh.pp_microbatches={microbatches} does not divide the micro-batch size "
                         f"{micro_batch} (train.batch_size // train.grad_accum); use one of {fits}")
    if (micro_batch // microbatches) % batch_ways:
        raise ValueError(f"each pipeline microbatch has {micro_batch // microbatches} sequences "
                         f"(micro-batch {micro_batch} / mesh.pp_microbatches={microbatches}), not "
                         f"divisible by the {batch_ways} devices the batch is split over; lower "
                         f"mesh.pp_microbatches or raise the batch size")


# ---------------------------------------------------------------------------------------
# One pipeline pass: gradients of the mean loss over M microbatches.

def _positions(inputs):
    return jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)


def _stage_fn(graphdef, blocks, outer, x_in, tokens, is_first, is_last):
    """Stage forward: (x_out [B, T, D], loss part). Stage 0 embeds `tokens` [B, T + 1]
    instead of reading x_in; the last stage adds the head loss; every stage adds the aux
    loss of its own layers (a sum over layers, so stages add up to the whole model's)."""
    model = nnx.merge(graphdef, {**outer, "blocks": blocks})
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = _positions(inputs)
    x = jax.lax.cond(is_first, lambda: model.embed_tokens(inputs, positions), lambda: x_in)
    x, _, aux = model.apply_blocks(x, positions)
    head = jax.lax.cond(is_last, lambda: model.head_loss(model.final_norm(x), targets).astype(jnp.float32),
                        lambda: jnp.zeros((), jnp.float32))
    return x, head + model.aux_loss(aux)


def _pipeline_pass(graphdef, table: Timetable, blocks, outer, micro_tokens):
    """Runs inside shard_map (manual over `pipeline`): this stage's block grads, the
    non-block grads (psum over stages) and the mean loss, for tokens [M, B / M, T + 1]."""
    stages, m = table.ops.shape[1], micro_tokens.shape[0]
    stage = jax.lax.axis_index(AXIS)
    is_first, is_last = stage == 0, stage == stages - 1

    def run(b, o, x, tokens):
        return _stage_fn(graphdef, b, o, x, tokens, is_first, is_last)

    inputs = micro_tokens[0, :, :-1]
    act = jax.eval_shape(lambda o: nnx.merge(graphdef, {**o, "blocks": blocks}).embed_tokens(
        inputs, _positions(inputs)), outer)  # [B / M, T, D] in the compute dtype
    zeros_act = jnp.zeros(act.shape, act.dtype)
    names = (None, BATCH, LENGTH, ACT_EMBED)
    acts = constrain(jnp.zeros((table.act_slots,) + act.shape, act.dtype), names)
    grads_in = constrain(jnp.zeros((table.grad_slots,) + act.shape, act.dtype), names)
    zeros_like = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731
    forward_perm = [(s, s + 1) for s in range(stages - 1)]
    backward_perm = [(s + 1, s) for s in range(stages - 1)]

    def tick(carry, row):
        acts, grads_in, g_blocks, g_outer, loss = carry
        op, j, recv_act, recv_grad = (r[stage] for r in row)
        j = jnp.maximum(j, 0)
        x_in, tokens = acts[j % table.act_slots], micro_tokens[j]

        def idle():
            return zeros_act, zeros_act, g_blocks, g_outer, jnp.zeros((), jnp.float32)

        def forward():
            y, part = run(blocks, outer, x_in, tokens)
            return y, zeros_act, g_blocks, g_outer, part

        def backward():  # recompute the stage from its kept input, then pull back
            _, pull = jax.vjp(lambda b, o, x: run(b, o, x, tokens), blocks, outer, x_in)
            g_y = jnp.where(is_last, zeros_act, grads_in[j % table.grad_slots])
            d_blocks, d_outer, d_x = pull((g_y, jnp.asarray(1.0 / m, jnp.float32)))
            add = lambda acc, g: jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)  # noqa: E731
            return zeros_act, d_x, add(g_blocks, d_blocks), add(g_outer, d_outer), jnp.zeros((), jnp.float32)

        y, d_x, g_blocks, g_outer, part = jax.lax.switch(op, (idle, forward, backward))
        y = jax.lax.ppermute(y, AXIS, forward_perm)
        d_x = jax.lax.ppermute(d_x, AXIS, backward_perm)
        acts = _store(acts, recv_act, y)
        grads_in = _store(grads_in, recv_grad, d_x)
        return (acts, grads_in, g_blocks, g_outer, loss + part), None

    rows = tuple(jnp.asarray(a) for a in (table.ops, table.micro, table.recv_act, table.recv_grad))
    init = (acts, grads_in, zeros_like(blocks), zeros_like(outer), jnp.zeros((), jnp.float32))
    (_, _, g_blocks, g_outer, loss), _ = jax.lax.scan(tick, init, rows)
    return g_blocks, jax.lax.psum(g_outer, AXIS), jax.lax.psum(loss, AXIS) / m


def _store(buffer, micro, value):
    """buffer[micro % slots] = value where micro >= 0 (a microbatch arrived), else unchanged."""
    slot = jnp.maximum(micro, 0) % buffer.shape[0]
    return buffer.at[slot].set(jnp.where(micro >= 0, value, buffer[slot]))


def _pipeline_grads_fn(graphdef, mesh, table: Timetable, microbatches: int):
    """(params, tokens [B, T + 1]) -> (mean loss, fp32 grads like params)."""

    def grads(params, tokens):
        outer = {k: v for k, v in params.items() if k != "blocks"}
        b, t1 = tokens.shape
        # Microbatch i takes rows i, i + M, ...: the reshape keeps each device's batch rows.
        micro = tokens.reshape(b // microbatches, microbatches, t1).swapaxes(0, 1)  # [M, B/M, T+1]
        stage_spec = jax.tree.map(lambda _: PartitionSpec(AXIS), params["blocks"])
        whole = jax.tree.map(lambda _: PartitionSpec(), outer)
        run = jax.shard_map(functools.partial(_pipeline_pass, graphdef, table), mesh=mesh, axis_names={AXIS},
                            in_specs=(stage_spec, whole, PartitionSpec()),
                            out_specs=(stage_spec, whole, PartitionSpec()), check_vma=False)
        g_blocks, g_outer, loss = run(params["blocks"], outer, micro)
        return loss, {**g_outer, "blocks": g_blocks}

    return grads



# ---------------------------------------------------------------------------------------
# The train step.

class PipelineStep(ShardedStep):
    """The pipeline step (`ShardedStep`: built per argument shape, traced under the mesh and
    rules, donating the state); `stats` is `schedule_stats` of its schedule."""

    def __init__(self, make_fn, make_shardings, mesh, rules: Rules, stats: dict):
        super().__init__(make_fn, make_shardings, mesh, rules, donate_argnums=0)
        self.stats = stats


def make_pipeline_train_step(graphdef, optimizer: optax.GradientTransformation, schedule=None, *,
                             mesh, rules: str | Rules, microbatches: int, pp_schedule: str = "gpipe"):
    """A jitted pipeline-parallel `train_step(state, batch) -> (state, metrics)` that donates
    `state`; the contract of `llmjax.train.step.make_train_step`.

    state: {"params", "opt_state", "step"}; batch: [grad_accum, micro_batch, T + 1] int32.
    Each micro-batch is cut into `microbatches` pipeline microbatches and run through the
    stages by `pp_schedule`; gradients are summed in fp32 over microbatches and micro-
    batches and averaged: equal to one step on the whole batch.
    Metrics: loss, grad_norm (before clipping), lr (with `schedule`), pp_bubble (idle
    fraction of the executed timetable, see `schedule_stats`).

    Args:
      graphdef: the model's graphdef; its params hold the stacked blocks under "blocks".
      optimizer: an optax transformation.
      schedule: optional step -> learning rate, reported as metrics["lr"].
      mesh: a mesh with a `pipeline` axis (`sharding.mesh.make_mesh`); its size is the
        number of stages.
      rules: a preset name or table for the other axes (dp, fsdp, zero1, ...); block
        params' `layers` dim goes to `pipeline` (`pipeline_rules`).
      microbatches: pipeline microbatches per micro-batch (mesh.pp_microbatches).
      pp_schedule: "gpipe" or "1f1b" (mesh.pp_schedule).
    Returns:
      A `PipelineStep`.
    Raises:
      ValueError: unknown schedule or rules, microbatches < 1, a mesh that also splits
        over tensor, sequence or expert, or over both data and fsdp (at once); layers not
        divisible by stages, microbatches not dividing the micro-batch or the batch split
        (on the first call).
    """
    stages = mesh.shape[AXIS]
    # TODO(#7): tensor/sequence/expert splits inside the stages: XLA's SPMD partitioner
    # (jax 0.11.2, CPU) aborts on them ("partition_group_list" check) in this shard_map.
    model_parallel = {a: mesh.shape[a] for a in _UNSUPPORTED_AXES if mesh.shape.get(a, 1) > 1}
    if model_parallel:
        raise ValueError(f"pipeline parallelism combines with batch and fsdp splits only (rules dp, "
                         f"fsdp, zero1); the mesh also has {model_parallel}: set those axes to 1")
    if mesh.shape.get("data", 1) > 1 and mesh.shape.get("fsdp", 1) > 1:  # same abort, one check
        raise ValueError(f"pipeline parallelism splits the batch over data or fsdp, not both; got "
                         f"data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']}: set one of them to 1")
    table = timetable(pp_schedule, stages, microbatches)
    stats = schedule_stats(pp_schedule, stages, microbatches)
    param_rules, _ = pipeline_rules(rules)
    batch_axes = dict(param_rules)[BATCH]

    def make_shardings(state, batch):
        n_layers = jax.tree.leaves(state["params"]["blocks"])[0].shape[0]
        check_pipeline(n_layers=n_layers, stages=stages, micro_batch=batch.shape[1],
                       microbatches=microbatches,
                       batch_ways=batch_ways(mesh, rules))
        state_sh = pipeline_state_shardings(graphdef, state, mesh, rules)
        batch_sh = NamedSharding(mesh, PartitionSpec(None, batch_axes, None))
        return (state_sh, batch_sh), (state_sh, NamedSharding(mesh, PartitionSpec()))

    def make_fn(in_shardings, state, batch):
        grads_fn = _pipeline_grads_fn(graphdef, mesh, table, microbatches)

        def train_step(state, batch):
            params = state["params"]

            def accumulate(carry, tokens):
                loss_sum, grad_sum = carry
                loss, grads = grads_fn(params, tokens)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), batch)
            n = batch.shape[0]
            grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grad_sum, params)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads),
                       "pp_bubble": jnp.asarray(stats["bubble"], jnp.float32)}
            if schedule is not None:
                metrics["lr"] = schedule(state["step"])
            return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                    "step": state["step"] + 1}, metrics

        return train_step

    return PipelineStep(make_fn, make_shardings, mesh, param_rules, stats)
