"""Search a kernel's config space for one shape: time every candidate on the device, keep the best.

A `Problem` names the kernel and shape key, gives the heuristic default config, a `build(config,
mode)` returning (jitted function, argument tuples), and stages: each stage times its candidate
field overrides, applied on top of the best config so far, with one program (`mode`, e.g. "fwd",
then the backward tiles with "fwd_bwd"). Candidates whose config is rejected or whose program
fails to compile or run are skipped, and the reason kept. At the end the default and the winner
are timed again, alternately, in every mode whose program they change; the winner is kept only if
it is at least as fast as the default in each, so a table entry is never slower than the
heuristic it replaces.
"""
import dataclasses
import datetime
from typing import Callable

from pallas_kernels import _bench
from pallas_kernels.autotune import table


@dataclasses.dataclass(frozen=True)
class Stage:
    """One coordinate of the search: `mode` picks the program, `candidates` the field overrides
    (dicts; a nested dataclass field takes a dict of its own fields)."""
    mode: str
    candidates: tuple[dict, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """kernel, key: where the winner goes in the table. default: the heuristic config.
    build(config, mode) -> (function, [argument tuples]); the function is jitted.
    flops, nbytes: per mode (optional), for the report's throughput."""
    kernel: str
    key: str
    default: object
    stages: tuple[Stage, ...]
    build: Callable
    flops: dict | None = None
    nbytes: dict | None = None


def _time(build, config, mode, reps):
    """Median seconds of build(config, mode); compile errors raise with a "compile" prefix."""
    fn, arg_sets = build(config, mode)
    try:
        compiled = fn.lower(*arg_sets[0]).compile()
    except Exception as e:
        raise RuntimeError(f"compile: {_bench.error_text(e, first_line=True)}") from e
    return _bench.median_seconds(compiled, arg_sets, reps, min_sample_seconds=2e-3)


def _modes(problem):
    return list(dict.fromkeys(stage.mode for stage in problem.stages))


def tune(problem: Problem, *, reps: int = 20, confirm_rounds: int = 3, log=print) -> dict:
    """Search `problem`; returns a result dict for table.record and the report:
    kernel, key, default and best (config fields), candidates (stage, overrides, time_ms or
    error), default_ms and tuned_ms per mode (medians of the confirmation rounds), kept_default,
    date, timer. Raises RuntimeError if the default config itself cannot be timed."""
    best = problem.default
    tried = []
    for index, stage in enumerate(problem.stages):
        best_seconds = None
        for overrides in ({},) + tuple(c for c in stage.candidates if c):
            row = dict(stage=index, mode=stage.mode, overrides=overrides)
            tried.append(row)
            try:
                config = table.apply_fields(best, overrides)
            except (ValueError, TypeError) as e:
                row["error"] = f"invalid: {_bench.error_text(e, first_line=True)}"
                continue
            try:
                seconds = _time(problem.build, config, stage.mode, reps)
            except Exception as e:  # a candidate that cannot run is skipped, with the reason
                if not overrides:
                    raise RuntimeError(f"{problem.kernel} [{problem.key}]: the starting config "
                                       f"fails in mode {stage.mode}: {e}") from e
                row["error"] = _bench.error_text(e, first_line=True)
                continue
            row["time_ms"] = seconds * 1e3
            if log:
                log(f"{problem.kernel} [{problem.key}] {stage.mode} {overrides or 'start'}: "
                    f"{seconds * 1e3:.4f} ms")
            if best_seconds is None or seconds < best_seconds:
                best_seconds, stage_best = seconds, config
        best = stage_best
    default_ms, tuned_ms = _confirm(problem, best, reps, confirm_rounds)
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


def _confirm(problem, best, reps, rounds):
    """Time default and best alternately `rounds` times per mode; medians of the rounds in ms.
    A mode where both give the same program is timed once for both (no noise to mislead)."""
    default_ms, tuned_ms = {}, {}
    for mode in _modes(problem):
        if best == problem.default or _same_program(problem.build, problem.default, best, mode):
            seconds = [_time(problem.build, best, mode, reps) for _ in range(rounds)]
            default_ms[mode] = tuned_ms[mode] = 1e3 * sorted(seconds)[len(seconds) // 2]
            continue
        pairs = [(_time(problem.build, problem.default, mode, reps),
                  _time(problem.build, best, mode, reps)) for _ in range(rounds)]
        default_ms[mode] = 1e3 * sorted(p[0] for p in pairs)[rounds // 2]
        tuned_ms[mode] = 1e3 * sorted(p[1] for p in pairs)[rounds // 2]
    return default_ms, tuned_ms
