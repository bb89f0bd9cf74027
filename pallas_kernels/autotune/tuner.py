"""Search a kernel's config space for one shape: time every candidate on the device, keep the best.

A `Problem` names the kernel and shape key, gives the heuristic default config, a `build(config,
mode)` returning (jitted function, argument tuples), and stages: each stage times its candidate
field overrides, applied on top of the best config so far, with one program (`mode`, e.g. "fwd",
then the backward tiles with "fwd_bwd"). Candidates whose config is rejected, whose program fails
to compile or run, or whose outputs differ from the stage's starting config beyond rounding are
skipped, and the reason kept. At the end the default and the winner
are timed again, alternately, in every mode whose program they change; the winner is kept only if
it is at least as fast as the default in each, so a table entry is never slower than the
heuristic it replaces.

Compiling dominates a run's wall time, so a stage's candidates, independent of each other, compile
on a pool of threads (XLA compiles with the GIL released) and are then timed one at a time. Each
(config, mode) program is compiled once: the confirmation rounds reuse what the search compiled.
"""
import concurrent.futures
import dataclasses
import datetime
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.autotune import table

# A candidate's outputs may differ from the starting config's by rounding (another summation
# order, 16-bit outputs: ~1e-2 relative); beyond this fraction of the largest |value| it is wrong.
RESULT_TOLERANCE = 5e-2


@dataclasses.dataclass(frozen=True)
class Stage:
    """One coordinate of the search: `mode` picks the program, `candidates` the field overrides
    (dicts; a nested dataclass field takes a dict of its own fields)."""
    mode: str
    candidates: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """kernel, key: where the winner goes in the table. default: the heuristic config.
    build(config, mode) -> (function, [argument tuples]); the function is jitted. Configs are
    frozen dataclasses: hashable, they key the compiled programs.
    flops, nbytes: per mode (optional), for the report's throughput."""
    kernel: str
    key: str
    default: object
    stages: tuple[Stage, ...]
    build: Callable
    flops: dict | None = None
    nbytes: dict | None = None


class _Program(NamedTuple):
    """build(config, mode)'s function compiled for its argument sets: ready to time."""
    config: object
    compiled: object
    arg_sets: list


def _compile(fn, arg_sets):
    """fn lowered and compiled for arg_sets[0]; errors raise with a "compile" prefix."""
    try:
        return fn.lower(*arg_sets[0]).compile()
    except Exception as e:
        raise RuntimeError(f"compile: {_bench.error_text(e, first_line=True)}") from e


def _caught(fn, *args):
    """fn(*args), or the exception it raised: a failure is reported with its candidate, in order."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def _programs(build, keys, workers):
    """A _Program for each (config, mode) in `keys`, in order; in its place the exception that
    stopped it, or None for a None key. build() runs on this thread, so a problem's builder need
    not be thread-safe; lowering and compiling, the bulk of a tuning run's wall time, run on
    `workers` threads (XLA compiles with the GIL released). workers=1 compiles each key only as
    the caller reaches it, as a serial search would."""
    def built(key):
        return None if key is None else _caught(build, *key)

    def compiled(key, fn_and_args):
        if key is None or isinstance(fn_and_args, Exception):
            return fn_and_args
        fn, arg_sets = fn_and_args
        return _caught(lambda: _Program(key[0], _compile(fn, arg_sets), arg_sets))

    if workers == 1:
        return (compiled(key, built(key)) for key in keys)
    # All compiled before any is timed: a compile running beside a timing would share the host
    # with it (the wall-clock timer) and, where XLA autotunes, the device.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(compiled, keys, [built(key) for key in keys]))


def _checked(program, expected):
    """program if its outputs on its first argument set match `expected` (the starting config's)
    within RESULT_TOLERANCE of their largest |value|: wide enough for 16-bit rounding, and a
    tile that garbles its output (NaN, stale or doubled blocks of a small case) fails it; an
    error confined to a few rows of a large output may pass."""
    got = program.compiled(*program.arg_sets[0])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        error, scale = float(jnp.max(jnp.abs(a - b))), float(jnp.max(jnp.abs(b)))
        if not error <= RESULT_TOLERANCE * (scale + 1e-6):  # also catches NaN
            raise RuntimeError(f"wrong result: max |difference| {error:.3g} from the starting "
                               f"config's, over {RESULT_TOLERANCE} x its max |value| {scale:.3g}")
    return program


def _time(program, reps):
    """Median seconds of a _Program."""
    return _bench.median_seconds(program.compiled, program.arg_sets, reps, min_sample_seconds=2e-3)


def _modes(problem):
    return list(dict.fromkeys(stage.mode for stage in problem.stages))


def default_workers() -> int:
    """Compile threads by default: one per core, at most 8."""
    return min(8, os.cpu_count() or 1)


def tune(problem: Problem, *, reps: int = 20, confirm_rounds: int = 3, log=print,
         workers: int | None = None) -> dict:
    """Search `problem`; returns a result dict for table.record and the report:
    kernel, key, default and best (config fields), candidates (stage, overrides, time_ms or
    error), default_ms and tuned_ms per mode (medians of the confirmation rounds), kept_default,
    date, timer. workers: threads compiling a stage's candidates at once (1: no threads, each
    compiled just before it is timed). Raises RuntimeError if the default config itself cannot
    be timed."""
    workers = default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an int >= 1")
    best = problem.default
    tried = []
    programs = {}  # (config, mode) -> _Program: the default's and each stage winner's, for _confirm
    for index, stage in enumerate(problem.stages):
        rows, keys = [], []
        for overrides in ({},) + tuple(c for c in stage.candidates if c):
            rows.append(dict(stage=index, mode=stage.mode, overrides=overrides))
            try:
                keys.append((table.apply_fields(best, overrides), stage.mode))
            except (ValueError, TypeError) as e:
                rows[-1]["error"] = f"invalid: {_bench.error_text(e, first_line=True)}"
                keys.append(None)
        tried += rows
        best_seconds, expected = None, None
        for row, key, program in zip(rows, keys, _programs(problem.build, keys, workers)):
            if key is None:
                continue
            # A candidate that cannot compile or run, or whose result differs from the stage's
            # starting config (the first row), is skipped, with the reason.
            if not isinstance(program, Exception):
                if expected is None:  # the starting config: its failure is raised below
                    expected = _caught(program.compiled, *program.arg_sets[0])
                    program = expected if isinstance(expected, Exception) else program
                else:
                    program = _caught(_checked, program, expected)
            outcome = program if isinstance(program, Exception) else _caught(_time, program, reps)
            if isinstance(outcome, Exception):
                if not row["overrides"]:
                    raise RuntimeError(f"{problem.kernel} [{problem.key}]: the starting config "
                                       f"fails in mode {stage.mode}: {outcome}") from outcome
                row["error"] = _bench.error_text(outcome, first_line=True)
                continue
            seconds = outcome
            row["time_ms"] = seconds * 1e3
            if log:
                log(f"{problem.kernel} [{problem.key}] {stage.mode} {row['overrides'] or 'start'}: "
                    f"{seconds * 1e3:.4f} ms")
            if program.config == problem.default:
                programs[key] = program
            if best_seconds is None or seconds < best_seconds:
                best_seconds, stage_best = seconds, program
        best = stage_best.config
        programs[best, stage.mode] = stage_best
    default_ms, tuned_ms = _confirm(problem, best, reps, confirm_rounds, programs, workers)
    kept_default = any(tuned_ms[m] > default_ms[m] for m in default_ms)
    if kept_default:
        best, tuned_ms = problem.default, dict(default_ms)
    return dict(kernel=problem.kernel, key=problem.key, default=table.config_fields(problem.default),
                best=table.config_fields(best), candidates=tried, default_ms=default_ms,
                tuned_ms=tuned_ms, kept_default=kept_default, flops=problem.flops,
                nbytes=problem.nbytes, date=datetime.date.today().isoformat(),
                timer=_bench.timer_name())


def _same_program(build, config_a, config_b, mode) -> bool:
    """Whether two configs give the same program in `mode` (equal lowered text): a mode that
    ignores the fields they differ in (a forward program and backward tiles, say)."""
    texts = []
    for config in (config_a, config_b):
        fn, arg_sets = build(config, mode)
        texts.append(fn.lower(*arg_sets[0]).as_text())
    return texts[0] == texts[1]


def _confirm(problem, best, reps, rounds, programs, workers):
    """Time default and best alternately `rounds` times per mode; medians of the rounds in ms.
    A mode where both give the same program is timed once for both (no noise to mislead). Each
    (config, mode) is compiled once for all rounds; `programs` (config, mode) -> _Program holds
    those the search compiled, and gets the others."""
    default = problem.default
    timed = {mode: (best,) if best == default or _same_program(problem.build, default, best, mode)
             else (default, best) for mode in _modes(problem)}
    missing = [(config, mode) for mode, configs in timed.items() for config in configs
               if (config, mode) not in programs]
    for key, program in zip(missing, _programs(problem.build, missing, workers)):
        if isinstance(program, Exception):
            raise program
        programs[key] = program
    default_ms, tuned_ms = {}, {}
    for mode, configs in timed.items():
        samples = [[_time(programs[config, mode], reps) for config in configs]
                   for _ in range(rounds)]
        medians = [1e3 * sorted(s[i] for s in samples)[rounds // 2] for i in range(len(configs))]
        default_ms[mode], tuned_ms[mode] = medians[0], medians[-1]
    return default_ms, tuned_ms
