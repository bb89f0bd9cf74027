"""Shared by the ops' bench.py: timing and the fields every row is built from.

Timing (STYLE 2.9): warm up, then the median of `reps` samples. On a GPU a sample is the device
time of one call, read through CUPTI (`jax.experimental.mosaic.gpu.profiler.measure`), so host
dispatch (tens of microseconds a call) stays out of short kernels; elsewhere it is wall-clock
time ended by block_until_ready.
"""
import datetime
import pathlib
import re
import statistics
import tempfile
import time

import jax

# Inputs over this many bytes are not rotated: they cannot stay in the H100's 50 MB L2 anyway.
_ROTATE_BELOW_BYTES = 256 << 20
_ROTATED_SETS = 4


def timer_name() -> str:
    """Which clock median_seconds reads here: "cupti" (GPU device time) or "wall"."""
    return "cupti" if jax.default_backend() == "gpu" else "wall"


def _cupti_median_seconds(fn, arg_sets, reps):
    from jax.experimental.mosaic.gpu import profiler

    samples = []
    per_set = -(-reps // len(arg_sets))
    for args in arg_sets:
        _, times_ms = profiler.measure(fn, iterations=per_set)(*args)
        if times_ms is None or None in times_ms:
            raise RuntimeError("CUPTI saw no kernel launched by the benchmarked function")
        samples += list(times_ms)
    return statistics.median(samples) / 1e3


# Kernel classes of a CUPTI kernel list; first match wins, on lower-cased names.
KERNEL_CLASSES = (
    # dot_do_o, convert_dq: cuDNN flash attention's backward helpers (rowsum(dO * O), dQ to bf16)
    ("attention", ("sdpa", "fmha", "flash", "attention", "attn", "dot_do_o", "convert_dq")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "wgmma", "dot")),
)


def kernel_class(name: str) -> str:
    """"attention", "matmul" or "other" for a kernel name."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def kernels_by_name(kernels) -> dict[str, tuple[float, int]]:
    """{name: (total ms, launches)} of a CUPTI list of (name, ms), names without their numeric
    suffixes (fusion.12 and fusion.3 are one row: the same kind of kernel at another site)."""
    table: dict[str, tuple[float, int]] = {}
    for name, ms in kernels or ():
        base = re.sub(r"[._]\d+$", "", name)[:120]
        total, count = table.get(base, (0.0, 0))
        table[base] = (total + ms, count + 1)
    return table


def traced_gpu_kernels(run) -> list[tuple[str, int, int]]:
    """(name, start ns, duration ns) of every GPU kernel launched while `run()` runs (it should
    block on its results), in start order, read from a jax.profiler trace: the device's own
    timeline, so unlike a CUPTI pass over a re-jitted call it times the program as it runs
    (donated buffers, kernels inside XLA command buffers) and shows the gaps between kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        (path,) = pathlib.Path(tmp).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
    return sorted(((event.name, event.start_ns, event.duration_ns)
                   for plane in data.planes if plane.name.startswith("/device:GPU")
                   for line in plane.lines if line.name.startswith("Stream")
                   for event in line.events), key=lambda k: k[1])


def timeline_breakdown(kernels, n_runs: int, top: int = 25,
                       classify=kernel_class) -> tuple[dict[str, float], list]:
    """Per run of a traced timeline (`traced_gpu_kernels` over n_runs runs): ms by
    `classify(kernel name)` (kernel_class: matmul, attention, other) plus "gaps" (time between
    the first kernel's start and the last one's end with no kernel running, overlaps counted
    once), and the `top` costliest kernels as (name without numeric suffix, ms, launches) per run."""
    ms = dict.fromkeys(("matmul", "attention", "other"), 0.0)
    for name, _, duration in kernels:
        part = classify(name)
        ms[part] = ms.get(part, 0.0) + duration / 1e6 / n_runs
    ms["other"] = ms.pop("other")  # the named parts first, then the rest, then the gaps
    ms["gaps"] = 0.0
    by_name = kernels_by_name((name, duration / 1e6) for name, _, duration in kernels)
    busy_end = None
    for _, start, duration in kernels:  # sorted by start
        if busy_end is not None and start > busy_end:
            ms["gaps"] += (start - busy_end) / 1e6 / n_runs
        busy_end = start + duration if busy_end is None else max(busy_end, start + duration)
    rows = sorted(((name, round(total / n_runs, 3), round(count / n_runs, 2))
                   for name, (total, count) in by_name.items()), key=lambda r: -r[1])
    return ms, rows[:top]


def hlo_source_frames(hlo_text: str) -> dict[str, list[tuple[str, str]]]:
    """{kernel name: [(source file, function), ...], innermost call first} for each instruction
    of a compiled module's text (`compiled.as_text()`) that carries a stack frame. XLA names a
    GPU kernel after its fusion with "." as "_" (loop_add_fusion.25 runs as
    loop_add_fusion_25), so this maps a traced kernel to the Python code that produced it."""
    def table(title):  # the "<id> <text>" lines under a title line
        block = re.search(rf"^{title}\n((?:\d+ .*\n?)*)", hlo_text, re.M)
        return dict((int(i), text) for i, text in re.findall(r"^(\d+) (.*)$", block.group(1), re.M)) if block else {}

    def fields(text):
        return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", text)}

    files = {i: text.strip('"') for i, text in table("FileNames").items()}
    functions = {i: text.strip('"') for i, text in table("FunctionNames").items()}
    locations = {i: (files.get(f["file_name_id"], "?"), functions.get(f["function_name_id"], "?"))
                 for i, f in ((i, fields(text)) for i, text in table("FileLocations").items())}
    # The text gives each frame's parent as the parent's id + 1 (1: no parent).
    parents = {i: (f["file_location_id"], f["parent_frame_id"] - 1)
               for i, f in ((i, fields(text)) for i, text in table("StackFrames").items())}

    def chain(frame):
        calls = []
        while frame in parents and len(calls) < len(parents):
            location, frame = parents[frame]
            calls.append(locations.get(location, ("?", "?")))
        return calls

    found = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*?stack_frame_id=(\d+)", hlo_text, re.M)
    return {name.replace(".", "_"): chain(int(frame)) for name, frame in found}


def wall_seconds(fn, reps: int, statistic=statistics.median) -> float:
    """Median (or `statistic`) wall-clock seconds of fn() (its outputs blocked on) after one
    warm-up call: for programs CUPTI cannot time alone (host transfers, whole decode loops with
    host work)."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistic(samples)


def median_seconds(fn, arg_sets, reps, *, warmup=1, min_sample_seconds=0.0):
    """Median seconds per call of fn(*args) over `reps` samples, after warm-up.

    On a GPU the samples are CUPTI device times (see timer_name) and min_sample_seconds is moot.

    Args:
      fn: a jitted or compiled function.
      arg_sets: argument tuples; sample i calls fn(*arg_sets[i % len(arg_sets)]), so several sets
        keep a small input from being read out of L2 on every call.
      reps: number of timed samples.
      warmup: untimed calls per argument set before the first sample.
      min_sample_seconds: 0: a sample is one call. Otherwise one more timed call sizes `inner` so
        that a sample, `inner` calls back to back then one block_until_ready, lasts about this
        long; launch overhead then stays out of short kernels. A sample counts its time / inner.
    """
    for args in arg_sets:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    if timer_name() == "cupti":
        return _cupti_median_seconds(fn, arg_sets, reps)
    inner = 1
    if min_sample_seconds:
        start = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[0]))
        inner = max(1, int(min_sample_seconds / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def add_bandwidth_timing(row: dict, make_fn, make_arg_sets, reps, *, nbytes) -> dict:
    """Time make_fn() (median_seconds, one warm-up per set) and add time_ms, bytes, gbps to `row`.

    make_arg_sets(n) gives the argument tuples: n = 4 for a program moving up to 256 MiB, whose
    inputs would otherwise stay in L2, else 1. An exception while building or timing becomes
    row["error"] instead, so one failing case keeps the other rows. Returns `row`.
    """
    try:
        arg_sets = make_arg_sets(1 if nbytes > _ROTATE_BELOW_BYTES else _ROTATED_SETS)
        seconds = median_seconds(make_fn(), arg_sets, reps)
    except Exception as e:
        row["error"] = error_text(e)
        return row
    row.update(throughput(seconds, nbytes=nbytes))
    return row


def select(cases, names=None) -> list:
    """The cases whose name is in `names` (all of them for None), in their order."""
    return [c for c in cases if names is None or c.name in names]


def environment() -> dict:
    """Row fields naming where and when it ran: device, jax version, date."""
    return dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.date.today().isoformat(), timer=timer_name())


def results_stem(name: str, device: str, date: str) -> str:
    """A result's file stem in benchmarks/results/: <name>_<device in lower snake case>_<date>."""
    from pallas_kernels.autotune.table import device_key
    return f"{name}_{device_key(device)}_{date}"


def throughput(seconds: float, *, nbytes=None, flops=None) -> dict:
    """Row fields of one timing: time_ms, then bytes and gbps (given nbytes) or tflops (given flops)."""
    fields = dict(time_ms=seconds * 1e3)
    if nbytes is not None:
        fields.update(bytes=nbytes, gbps=nbytes / seconds / 1e9)
    if flops is not None:
        fields.update(tflops=flops / seconds / 1e12)
    return fields


def error_text(error: Exception, *, limit=300, first_line=False) -> str:
    """A row's `error`: the exception type and its message (only the first line if asked), cut."""
    message = str(error)
    if first_line:
        message = message.splitlines()[0] if message else ""
    return f"{type(error).__name__}: {message[:limit]}"
