"""Timelines from inside the Mosaic GPU kernels: where a CTA's time goes, and how the CTAs fill
the SMs (the tail wave, the gaps between one CTA and the next on an SM).

Mosaic GPU's profiler (`CompilerParams.profile_space` / `profile_dir`) reads the GPU clock when a
warpgroup enters and leaves each `jax.named_scope` region of a kernel and, after a call,
writes the stamps as a Chrome-trace JSON (`<kernel>-<ns>-trace.json`, one file per kernel per
compilation: a later call of the same program writes it only if it was deleted; `pid` the SM,
`tid` one warpgroup of one CTA; `summarize` explains its two clocks). Each stamp costs a few cycles, so a
trace shows the shape of the time, not the kernel's best speed. Outside `recording` the regions
cost nothing.

    with mosaic_trace.recording("/tmp/traces"):
        out = jax.jit(attend)(q, k, v)  # traced inside: its Mosaic kernels record
    summary = mosaic_trace.summarize(mosaic_trace.newest_trace("/tmp/traces"), warpgroups=3)

The flash-attention kernels name their phases with `region` (forward: tile, first_step, step,
wait_turn / take_turns, last_pv, epilogue; backward: tile, step).
"""
import collections
import contextlib
import contextvars
import functools
import json
import pathlib
import statistics

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

# Regions a warpgroup may record in one call: a forward tile of 16k keys in 128-key steps enters
# ~260 (a step and a turn each). The stamps wait in shared memory (16 bytes a region per
# warpgroup: 15 KiB for a flash-attention CTA here), beside the kernel's own tiles.
DEFAULT_REGIONS = 320
_recording = contextvars.ContextVar("mosaic_trace_recording", default=None)


@contextlib.contextmanager
def recording(directory, regions: int = DEFAULT_REGIONS):
    """Mosaic kernels traced inside this context write their traces into `directory` when they
    run (see the module docstring: one file per kernel, kept until deleted).
    regions: how many named regions a warpgroup may enter per call; later ones are dropped
    (each costs 16 bytes of shared memory a warpgroup, which the kernels' own shared-memory
    checks do not count).
    JAX's tracing caches are cleared on entry and exit, so a function traced before (or
    after) does not bring (or keep) a program with the profiler off (or on)."""
    if not isinstance(regions, int) or regions < 1:
        raise ValueError(f"regions={regions!r} must be a positive int")
    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    jax.clear_caches()
    token = _recording.set((str(path), regions))
    try:
        yield path
    finally:
        _recording.reset(token)
        jax.clear_caches()


def compiler_params(**options) -> plgpu.CompilerParams:
    """plgpu.CompilerParams(**options), with the profiler on inside `recording`."""
    active = _recording.get()
    if active is not None:
        directory, regions = active
        options.update(profile_dir=directory, profile_space=regions, profile_bounds_check=True)
    return plgpu.CompilerParams(**options)


def region(name: str):
    """Decorator: each call of the function is the named region `name` of a trace."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)
        return run
    return wrap


def newest_trace(directory) -> pathlib.Path:
    """The trace written last into `directory`.

    Raises:
      FileNotFoundError: there is none (no Mosaic kernel ran inside `recording`).
    """
    traces = sorted(pathlib.Path(directory).glob("*-trace.json"), key=lambda p: p.stat().st_mtime_ns)
    if not traces:
        raise FileNotFoundError(f"no *-trace.json in {directory}: did a Mosaic kernel, jitted "
                                "inside mosaic_trace.recording, run on a GPU?")
    return traces[-1]


def _intervals(events):
    """(tid, sm, name, begin, end) of every region, from a trace's B/E events (nested per tid)."""
    open_by_tid = collections.defaultdict(list)
    for event in events:
        stack = open_by_tid[event["tid"]]
        if event["ph"] == "B":
            stack.append(event)
        else:
            begin = stack.pop()
            yield begin["tid"], begin["pid"], begin["name"], begin["ts"], event["ts"]


def summarize(trace, *, warpgroups: int, clock_ghz: float | None = None) -> dict:
    """Where the time went in one traced call.

    A trace's timestamps mix two clocks: each warpgroup's first stamp is the global timer (ns /
    1e3), the later ones add SM clock cycles / 1e3 to it. So a CTA's start is in microseconds and
    its length in cycles; the SM clock converts. Without clock_ghz it is estimated from the trace:
    a CTA's stamped cycles over the time to the next CTA's start on its SM is at most the clock
    (the next one cannot start before it ends), so the largest such ratio is taken. It is a
    lower bound: the unstamped set-up and wind-down of a CTA, and the global timer's rounding,
    count as gap, so durations come out a few percent long and gaps short. Pass the measured
    clock where it is known.

    Args:
      trace: a trace file's path, or its parsed JSON.
      warpgroups: warpgroups per CTA of the kernel (tids are numbered CTA by CTA; a flash
        attention kernel has its compute warpgroups plus one memory warpgroup).
      clock_ghz: the SM clock during the call, if known.
    Returns:
      clock_ghz (given or estimated), kernel_us (first CTA start to last CTA end), sms and ctas
      seen, cta_us (mean, min, max), busy (the SMs' share of kernel_us inside a CTA), tail_idle
      (their share after their last CTA ended), gap_us (mean time from one CTA's end to the
      next one's start on an SM) and regions: per name, the mean microseconds per occurrence,
      and per warpgroup that entered it in a CTA, the occurrences (per_cta) and their summed
      microseconds (total_per_cta_us), averaged over the CTAs.

    Raises:
      ValueError: bad warpgroups or clock_ghz, a trace without regions, or no SM that ran two
        CTAs to estimate the clock from (or an estimate outside 0.3-4 GHz).
    """
    data = json.loads(pathlib.Path(trace).read_text()) if not isinstance(trace, dict) else trace
    if not isinstance(warpgroups, int) or warpgroups < 1:
        raise ValueError(f"warpgroups={warpgroups!r} must be a positive int")
    if clock_ghz is not None and not 0.3 <= clock_ghz <= 4.0:
        raise ValueError(f"clock_ghz={clock_ghz!r} is not a GPU's SM clock in GHz (0.3-4)")
    intervals = list(_intervals(data["traceEvents"]))
    if not intervals:
        raise ValueError("the trace holds no regions: were the kernel's named scopes lowered?")
    origin = {}  # tid -> its first stamp (global timer, us)
    for tid, _, _, begin, _ in sorted(intervals, key=lambda i: i[3]):
        origin.setdefault(tid, begin)
    ctas = {}  # cta -> [sm, start us, length in cycles]
    for tid, sm, _, _, end in intervals:
        cta = (tid - 1) // warpgroups
        span = ctas.setdefault(cta, [sm, origin[tid], 0.0])
        span[1] = min(span[1], origin[tid])
        span[2] = max(span[2], (end - origin[tid]) * 1e3)
    by_sm = collections.defaultdict(list)
    for sm, start, cycles in ctas.values():
        by_sm[sm].append((start, cycles))
    for spans in by_sm.values():
        spans.sort()
    if clock_ghz is None:
        ratios = [a[1] / (b[0] - a[0]) / 1e3 for spans in by_sm.values()
                  for a, b in zip(spans, spans[1:]) if b[0] > a[0]]
        if not ratios:
            raise ValueError("no SM ran two CTAs one after the other: pass clock_ghz")
        clock_ghz = max(ratios)
        if not 0.3 <= clock_ghz <= 4.0:
            raise ValueError(f"the clock estimated from back-to-back CTAs, {clock_ghz:.3g} GHz, is "
                             "not an SM clock (0.3-4 GHz): pass clock_ghz")
    us = lambda cycles: cycles / (clock_ghz * 1e3)  # noqa: E731
    gaps, last_ends, durations = [], [], []
    for spans in by_sm.values():
        ends = [start + us(cycles) for start, cycles in spans]
        gaps += [b[0] - end for end, b in zip(ends, spans[1:])]
        last_ends.append(ends[-1])
        durations += [us(cycles) for _, cycles in spans]
    first = min(start for _, start, _ in ctas.values())
    kernel = max(last_ends) - first
    sms = len(by_sm)
    per_region = collections.defaultdict(list)  # name -> durations (us)
    per_cta_region = collections.defaultdict(lambda: collections.defaultdict(float))
    entered = collections.defaultdict(set)  # (cta, name) -> tids
    for tid, _, name, begin, end in intervals:
        cta, length = (tid - 1) // warpgroups, us((end - begin) * 1e3)
        per_region[name].append(length)
        per_cta_region[name][cta] += length
        entered[cta, name].add(tid)
    regions = {}
    for name, times in sorted(per_region.items()):
        totals = [total / len(entered[cta, name]) for cta, total in per_cta_region[name].items()]
        warpgroups_in = sum(len(entered[cta, name]) for cta in per_cta_region[name])
        regions[name] = dict(mean_us=statistics.fmean(times), per_cta=len(times) / warpgroups_in,
                             total_per_cta_us=statistics.fmean(totals))
    return dict(clock_ghz=clock_ghz, kernel_us=kernel, sms=sms, ctas=len(ctas),
                cta_us=dict(mean=statistics.fmean(durations), min=min(durations),
                            max=max(durations)),
                busy=sum(durations) / (sms * kernel),
                tail_idle=sum(max(last_ends) - end for end in last_ends) / (sms * kernel),
                gap_us=statistics.fmean(gaps) if gaps else 0.0,
                regions=regions)
