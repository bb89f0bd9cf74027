"""Pipeline parallelism: GPipe and 1F1B train like the unsharded twin; timetables; bad configs.

8 CPU devices: pp=2 runs with 4-way data/fsdp, pp=4 with 2-way. 4 microbatches: llama
(untied head) with dp; 8 microbatches: gpt2 (tied embeddings, learned positions, biases)
with fsdp, so every stage count and schedule meets both families and presets. Each
program is compiled once and shared by the equivalence and memory tests.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import MeshConfig, OptimConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from sharding.mesh import make_mesh
from sharding.pipeline import (SCHEDULES, check_pipeline, make_pipeline_train_step, pipeline_rules,
                               schedule_stats, timetable)
from tests.sharding.conftest import COMPILER_OPTIONS, FAMILIES, STEPS

TOL = 1e-5
GRAD_ACCUM, MICRO_BATCH, SEQ_LEN, N_LAYERS = 2, 32, 16, 4  # 32 / 8 microbatches / 4 devices
CASES = [(p, schedule, m) for p in (2, 4) for schedule in SCHEDULES for m in (4, 8)]


@functools.cache
def _setup(family="llama"):
    cfg = load_config(overrides=FAMILIES[family] + [f"model.n_layers={N_LAYERS}"]).model
    graphdef, params = split_model(init_model(cfg))
    optimizer = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), total_steps=100)
    batch = jax.random.randint(jax.random.key(3), (GRAD_ACCUM, MICRO_BATCH, SEQ_LEN + 1), 0,
                               cfg.vocab_size, dtype=jnp.int32)
    return graphdef, params, optimizer, batch


def _family_rules(m):
    return ("llama", "dp") if m == 4 else ("gpt2", "fsdp")


def _mesh(p, rules):
    return make_mesh(MeshConfig(pipeline=p, **{"data" if rules == "dp" else "fsdp": 8 // p}))


def _train(family, step, compiled=None):
    graphdef, params, optimizer, batch = _setup(family)
    state = init_train_state(jax.tree.map(jnp.array, params), optimizer)  # a copy: donated
    run = compiled or step
    losses, metrics = [], None
    for _ in range(STEPS):
        state, metrics = run(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


@functools.cache
def _reference(family):
    graphdef, _, optimizer, _ = _setup(family)
    return _train(family, make_train_step(graphdef, optimizer))


@functools.cache
def _pipelined(p, schedule, m):
    family, rules = _family_rules(m)
    graphdef, params, optimizer, batch = _setup(family)
    step = make_pipeline_train_step(graphdef, optimizer, mesh=_mesh(p, rules), rules=rules,
                                    microbatches=m, pp_schedule=schedule)
    state = init_train_state(params, optimizer)
    compiled = step.lower(state, batch).compile(compiler_options=COMPILER_OPTIONS)
    return (*_train(family, step, compiled), compiled)


@pytest.mark.parametrize("p,schedule,m", [pytest.param(*case, marks=pytest.mark.slow) if case[0] == 4
                                          else case for case in CASES])
def test_pipeline_trains_like_unsharded(p, schedule, m):
    family, rules = _family_rules(m)
    ref_losses, ref_state, _ = _reference(family)
    losses, state, metrics, _ = _pipelined(p, schedule, m)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=TOL)
    assert ref_losses[-1] < ref_losses[0]
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         state["params"], ref_state["params"])
    worst = max(jax.tree_util.tree_leaves_with_path(diffs), key=lambda kv: kv[1])
    assert worst[1] < TOL, f"pp={p} {schedule} m={m}: largest param difference {worst}"
    assert int(state["step"]) == STEPS
    assert float(metrics["pp_bubble"]) == pytest.approx((p - 1) / (m + p - 1))
    # Stages hold their layers; the other dims keep the preset's layout.
    wq = state["params"]["blocks"]["attn"]["wq"]
    fsdp = "fsdp" if rules == "fsdp" else None
    assert tuple(wq.sharding.spec)[:2] == ("pipeline", fsdp)
    assert wq.sharding.shard_shape(wq.shape)[0] == N_LAYERS // p
    embed_spec = tuple(state["params"]["embed"].sharding.spec)
    assert embed_spec + (None,) * (2 - len(embed_spec)) == (None, fsdp)  # jax drops trailing Nones


def test_1f1b_needs_less_temp_memory_than_gpipe():
    """1F1B keeps at most p stage inputs per stage, GPipe all m: the compiled program's temp
    bytes differ by at least those (m - p) inputs [B/M, T, D] per device."""
    p, m = 2, 8
    temp = {s: _pipelined(p, s, m)[3].memory_analysis().temp_size_in_bytes for s in SCHEDULES}
    stats = {s: schedule_stats(s, p, m) for s in SCHEDULES}
    assert (stats["gpipe"]["max_in_flight"], stats["1f1b"]["max_in_flight"]) == (m, p)
    d_model = _setup(_family_rules(m)[0])[1]["embed"].shape[1]
    slot_bytes = (MICRO_BATCH // m // (8 // p)) * SEQ_LEN * d_model * 4  # fp32, batch over fsdp
    assert temp["gpipe"] - temp["1f1b"] >= (m - p) * slot_bytes, temp


# ---------------------------------------------------------------------------------------
# Timetables (no compiling).

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p,m", [(1, 3), (2, 4), (4, 8), (4, 2), (3, 7)])
def test_timetable_runs_each_op_once_in_dependency_order(schedule, p, m):
    table = timetable(schedule, p, m)
    when = {}
    for t, (ops, micro) in enumerate(zip(table.ops, table.micro)):
        for s, (op, j) in enumerate(zip(ops, micro)):
            if op:
                assert (op, s, j) not in when
                when[(op, s, j)] = t
    assert len(when) == 2 * p * m
    for s in range(p):
        for j in range(m):
            assert s == 0 or when[(1, s - 1, j)] < when[(1, s, j)]
            assert when[(1, s, j)] < when[(2, s, j)]
            assert s == p - 1 or when[(2, s + 1, j)] < when[(2, s, j)]
    stats = schedule_stats(schedule, p, m)
    assert stats["bubble"] == pytest.approx((p - 1) / (m + p - 1)) == stats["ideal_bubble"]
    assert stats["max_in_flight"] == (m if schedule == "gpipe" else min(p, m))


# ---------------------------------------------------------------------------------------
# Bad configurations.

def test_bad_schedule_and_microbatches_fail_at_once():
    graphdef, _, optimizer, _ = _setup()
    mesh = _mesh(2, "dp")
    with pytest.raises(ValueError, match=r"mesh.pp_schedule='interleaved' .* use one of gpipe, 1f1b"):
        make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules="dp", microbatches=4,
                                 pp_schedule="interleaved")
    with pytest.raises(ValueError, match=r"mesh.pp_microbatches=0 must be >= 1"):
        make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules="dp", microbatches=0)
    with pytest.raises(ValueError, match=r"mesh.rules='fsdpp' is not a rule preset"):
        make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules="fsdpp", microbatches=4)
    with pytest.raises(ValueError, match=r"batch and fsdp splits only .* \{'tensor': 2\}"):
        make_pipeline_train_step(graphdef, optimizer, mesh=make_mesh(MeshConfig(pipeline=2, data=2, tensor=2)),
                                 rules="tp", microbatches=4)
    with pytest.raises(ValueError, match=r"over data or fsdp, not both; got data=2, fsdp=2"):
        make_pipeline_train_step(graphdef, optimizer, mesh=make_mesh(MeshConfig(pipeline=2, data=2, fsdp=2)),
                                 rules="fsdp", microbatches=4)


@pytest.mark.parametrize("p,rules,m,match", [
    (8, "dp", 4, r"model.n_layers=4 is not divisible by mesh.pipeline=8 .* use mesh.pipeline in \[1, 2, 4\]"),
    (2, "dp", 3, r"mesh.pp_microbatches=3 does not divide the micro-batch size 32"),
    (2, "dp", 16, r"each pipeline microbatch has 2 sequences .* not divisible by the 4 devices"),
])
def test_bad_pipeline_configs_name_the_key(p, rules, m, match):
    graphdef, params, optimizer, batch = _setup()
    mesh = make_mesh(MeshConfig(pipeline=p, data=8 // p))
    step = make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules=rules, microbatches=m)
    with pytest.raises(ValueError, match=match):
        step.lower(init_train_state(params, optimizer), batch)


def test_rules_must_leave_pipeline_to_the_stages():
    bad = tuple((name, "pipeline" if name == "mlp" else axes) for name, axes in pipeline_rules("dp")[0])
    with pytest.raises(ValueError, match=r"split \['mlp', 'layers'\] over mesh axis 'pipeline'"):
        pipeline_rules(bad)
    with pytest.raises(ValueError, match=r"n_layers=6 is not divisible by mesh.pipeline=4"):
        check_pipeline(n_layers=6, stages=4, micro_batch=8, microbatches=2)


def test_training_loop_runs_the_pipeline_step(tmp_path):
    """train() with mesh.pipeline > 1 uses the pipeline step and matches the unsharded run."""
    from llmjax.config import load_config
    from llmjax.train.loop import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    losses = []
    for name, extra in (("plain", []), ("pp", ["mesh.pipeline=2", "mesh.data=4", "mesh.pp_microbatches=2"])):
        cfg = load_config(overrides=[
            f"out_dir={tmp_path}", f"name={name}", "preset=gpt2-tiny", f"data.corpus={corpus}",
            "data.tokenizer=bytes", "model.vocab_size=320", "data.seq_len=32", "train.batch_size=16",
            "train.steps=3", "train.eval_every=3", "train.eval_batches=1", "train.sample_tokens=0", *extra])
        result = train(cfg, progress=False)
        losses.append((result.train_loss, result.val_loss))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
