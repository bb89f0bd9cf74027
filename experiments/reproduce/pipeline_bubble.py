"""Pipeline bubble (GPipe, Huang et al. 2019, section 2.3; Narayanan et al. 2021, section 2.2):
with p stages and m microbatches a pass idles (p-1)/(m+p-1) of its stage-time slots, and the
step time per sample falls as (m+p-1)/m toward its bubble-free floor.

The idle fraction is read from the executed timetable of `sharding.pipeline` (GPipe and 1F1B,
forward and backward one tick each), the program `make_pipeline_train_step` runs. Step time
is measured on GPUs (full size): one pipeline stage per device, a fixed global batch cut into m
microbatches; on a CPU the 8 simulated devices share the host's cores, so stages do not run
side by side and the time says nothing about the bubble (small size skips it).
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.reproduce.common import compare
from llmjax.config import MeshConfig, OptimConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state
from sharding.mesh import make_mesh
from sharding.pipeline import SCHEDULES, make_pipeline_train_step, schedule_stats

SOURCE = "Huang et al. 2019 (GPipe), sec. 2.3"
MICROBATCHES = (1, 2, 4, 8, 16, 32)


def time_steps(stages: int, microbatches, model_overrides: list[str], batch: int, seq_len: int,
               schedule: str = "1f1b", steps: int = 5) -> list[dict]:
    """Median seconds per train step of the pipeline over `stages` devices (data-parallel over
    the rest), one row per microbatch count."""
    cfg = load_config(overrides=model_overrides).model
    graphdef, params = split_model(init_model(cfg))
    optimizer = make_optimizer(OptimConfig(), total_steps=100)
    mesh = make_mesh(MeshConfig(pipeline=stages, data=jax.device_count() // stages))
    tokens = jax.random.randint(jax.random.key(0), (1, batch, seq_len + 1), 0, cfg.vocab_size, jnp.int32)
    rows = []
    for m in microbatches:
        step = make_pipeline_train_step(graphdef, optimizer, mesh=mesh, rules="dp", microbatches=m,
                                        pp_schedule=schedule)
        state = init_train_state(jax.tree.map(jnp.array, params), optimizer)
        times = []
        for _ in range(steps + 1):  # the first compiles
            start = time.perf_counter()
            state, metrics = step(state, tokens)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        rows.append(dict(schedule=schedule, stages=stages, microbatches=m, step_s=statistics.median(times[1:])))
    return rows


def run(small: bool) -> dict:
    stats = [schedule_stats(s, p, m) for s in SCHEDULES for p in (2, 4, 8) for m in MICROBATCHES]
    comparisons = [compare(f"{r['schedule']} bubble, p={r['stages']}, m={r['microbatches']}",
                           r["ideal_bubble"], r["bubble"], source=SOURCE)
                   for r in stats if r["stages"] == 4 and r["microbatches"] in (1, 4, 16)]
    timing = []
    if not small and jax.device_count() >= 2:  # one stage per device
        stages = min(jax.device_count(), 4)
        ms = [m for m in MICROBATCHES if m <= 16]
        timing = time_steps(stages, ms, ["preset=gpt2-medium", "model.n_layers=16"], batch=64, seq_len=1024)
        last = timing[-1]
        for r in timing:
            predicted = ((r["microbatches"] + stages - 1) / r["microbatches"]) / \
                ((last["microbatches"] + stages - 1) / last["microbatches"])
            r["predicted_relative"], r["measured_relative"] = predicted, r["step_s"] / last["step_s"]
            comparisons.append(compare(f"step time m={r['microbatches']} / m={last['microbatches']}, "
                                       f"p={stages}", predicted, r["measured_relative"], source=SOURCE,
                                       why_high="small microbatches run the GPU below full efficiency, "
                                       "and ppermute and recompute cost is not in the tick model",
                                       why_low=f"per-microbatch overhead (ppermute, small matmuls) slows "
                                       f"the m={last['microbatches']} reference more than the tick model "
                                       "says, which shrinks the ratio"))
    return dict(schedules=stats, timing=timing, comparisons=comparisons)


def format_result(result: dict) -> str:
    lines = [f"{'schedule':<8} {'p':>2} {'m':>3} {'ticks':>5} {'bubble':>7} {'(p-1)/(m+p-1)':>13} {'in flight':>9}"]
    for r in result["schedules"]:
        lines.append(f"{r['schedule']:<8} {r['stages']:2d} {r['microbatches']:3d} {r['ticks']:5d} "
                     f"{r['bubble']:7.3f} {r['ideal_bubble']:13.3f} {r['max_in_flight']:9d}")
    for r in result["timing"]:
        lines.append(f"time: p={r['stages']} m={r['microbatches']:2d} step {r['step_s'] * 1e3:8.1f} ms "
                     f"(relative {r['measured_relative']:.3f}, predicted {r['predicted_relative']:.3f})")
    return "\n".join(lines)


def plot(result: dict, plt):
    fig, axes = plt.subplots(1, 2 if result["timing"] else 1, figsize=(10 if result["timing"] else 5.5, 4),
                             squeeze=False)
    ax = axes[0][0]
    for p in (2, 4, 8):
        ms = np.array(MICROBATCHES)
        ax.plot(ms, (p - 1) / (ms + p - 1), "-", color=f"C{p // 4}", label=f"(p-1)/(m+p-1), p={p}")
        for marker, schedule in zip("ox", SCHEDULES):
            rows = [r for r in result["schedules"] if r["stages"] == p and r["schedule"] == schedule]
            ax.plot([r["microbatches"] for r in rows], [r["bubble"] for r in rows], marker, color=f"C{p // 4}",
                    label=f"{schedule} timetable, p={p}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("microbatches m")
    ax.set_ylabel("idle fraction")
    ax.legend(fontsize=7)
    if result["timing"]:
        ax = axes[0][1]
        ms = [r["microbatches"] for r in result["timing"]]
        ax.plot(ms, [r["measured_relative"] for r in result["timing"]], "o-", label="measured")
        ax.plot(ms, [r["predicted_relative"] for r in result["timing"]], "--", label="(m+p-1)/m, scaled")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("microbatches m")
        ax.set_ylabel("step time relative to largest m")
        ax.legend()
    return fig
