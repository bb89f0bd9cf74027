"""Where the Mosaic flash-attention kernels spend a CTA's time, and how the CTAs fill the SMs:
`python -m experiments.trace_attention [--cases s4k_d128_full s16k_d128_full] [--mode fwd]`.

Each case (a name of the benchmark table, pallas_kernels/flash_attention/cases.py) runs ours at
its tuned tiles once more with Mosaic GPU's in-kernel profiler on (pallas_kernels/mosaic_trace)
and is timed without it in the same process. Prints one line per kernel (CTA length, busy and
tail-idle shares of the SMs, the gap between CTAs, the named phases per warpgroup) and writes
benchmarks/results/attention-trace[-<label>]_<device>_<date>.json (+ .png; the raw traces, which
Perfetto opens, go to --trace-dir). GPU only: the profiler reads the GPU clocks.
"""
import argparse
import dataclasses
import json
import pathlib
import re
import sys
import tempfile

import jax
import jaxlib

from pallas_kernels import _bench, mosaic_trace
from pallas_kernels.flash_attention import bench, cases, config, mosaic_bwd
from pallas_kernels.flash_attention.api import flash_attention

RESULTS = pathlib.Path("benchmarks/results")
FORWARD_REGIONS = {"first_step", "take_turns"}  # only the forward kernel enters these


def parse_args(argv):
    names = [c.name for c in cases.BENCH_CASES_FULL]
    parser = argparse.ArgumentParser(prog="python -m experiments.trace_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["s4k_d128_full", "s16k_d128_full"],
                        choices=names, metavar="CASE", help=f"from {names}")
    parser.add_argument("--mode", choices=bench.MODES, default="fwd",
                        help="fwd: the forward kernel; fwd_bwd: it and the backward kernels")
    parser.add_argument("--label", default="", help="added to the results' file name")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    parser.add_argument("--trace-dir", type=pathlib.Path, default=None,
                        help="keep the raw traces here (default: a temporary folder)")
    parser.add_argument("--clock-ghz", type=float, default=None,
                        help="the SM clock during the run (default: estimated from each trace; "
                             "needed for a persistent kernel, one CTA an SM)")
    parser.add_argument("--regions", type=int, default=mosaic_trace.DEFAULT_REGIONS,
                        help="named regions a warpgroup may record (16 bytes of shared memory each)")
    args = parser.parse_args(argv)
    if args.label and not re.fullmatch(r"[A-Za-z0-9_-]+", args.label):
        parser.error(f"--label={args.label!r} may hold letters, digits, '-' and '_' only")
    if args.regions < 1:
        parser.error(f"--regions={args.regions} must be >= 1")
    return args


def _program(case, mode):
    """A jitted call of ours at the case's tuned tiles, and those tiles."""
    blocks = config.tuned_blocks(case.seq_q, case.seq_kv, case.head_dim, case.causal, "bfloat16")

    def attend(q, k, v, causal):
        return flash_attention(q, k, v, causal=causal, backend="mosaic", blocks=blocks)
    return bench._program(attend, case.causal, mode), blocks


def trace_case(case, mode, trace_dir: pathlib.Path, *, regions: int, clock_ghz=None) -> list[dict]:
    """Rows (one per traced kernel) of one case: its summary (or the error that stopped it), the
    call's time without the profiler, the tiles."""
    q, k, v, dout, _ = case.inputs(jax.numpy.bfloat16)
    args = (q, k, v, dout)  # the fwd program ignores dout
    program, blocks = _program(case, mode)
    seconds = _bench.median_seconds(program, [args], 20)
    folder = trace_dir / f"{case.name}-{mode}"
    with mosaic_trace.recording(folder, regions):
        compiled = _program(case, mode)[0].lower(*args).compile()
    for _ in range(2):  # the traces of the second call (the first warms up)
        for old in folder.glob("*-trace.json"):
            old.unlink()  # a kernel writes its trace only where the file is not there yet
        jax.block_until_ready(compiled(*args))
        jax.effects_barrier()  # the profiler writes its traces from host callbacks
    rows = []
    for path in sorted(folder.glob("*-trace.json"), key=lambda p: p.stat().st_mtime_ns):
        events = json.loads(path.read_text())
        forward = any(e["name"] in FORWARD_REGIONS for e in events["traceEvents"])
        warpgroups = (blocks.mosaic.compute_wgs if forward else mosaic_bwd.COMPUTE_WGS) + 1
        row = dict(case=case.name, mode=mode, kernel=path.name.rsplit("-", 2)[0],
                   call_ms=seconds * 1e3, blocks=dataclasses.asdict(blocks), trace=str(path))
        try:
            row.update(mosaic_trace.summarize(events, warpgroups=warpgroups, clock_ghz=clock_ghz))
        except ValueError as error:  # e.g. a persistent kernel without --clock-ghz
            row["error"] = _bench.error_text(error)
        rows.append(row)
    return rows


def line(row) -> str:
    if "error" in row:
        return f"{row['case']} {row['kernel']}: {row['error']}"
    regions = ", ".join(f"{name} {r['total_per_cta_us']:.1f} us ({r['per_cta']:.3g}x)"
                        for name, r in row["regions"].items() if name != "tile")
    cta = row["cta_us"]
    return (f"{row['case']} {row['kernel']}: {row['kernel_us']:.1f} us traced ({row['call_ms']:.3f} ms "
            f"untraced call), {row['ctas']} CTAs on {row['sms']} SMs at {row['clock_ghz']:.2f} GHz, "
            f"CTA {cta['mean']:.1f} us ({cta['min']:.1f}-{cta['max']:.1f}), busy {row['busy']:.1%}, "
            f"tail idle {row['tail_idle']:.1%}, gap {row['gap_us']:.2f} us; per warpgroup: {regions}")


def plot(rows, path, title):
    """Per kernel, the mean microseconds a warpgroup of a CTA spends in each named phase (tile =
    the whole compute warpgroup), with the SMs' busy and tail-idle shares."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "error" not in row]
    if not rows:
        return
    names = sorted({name for row in rows for name in row["regions"]})
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.5 * len(rows) * len(names)))
    labels, values = [], []
    for row in rows:
        for name in names:
            region = row["regions"].get(name)
            labels.append(f"{row['case']} {row['kernel']}: {name}")
            values.append(region["total_per_cta_us"] if region else 0.0)
    ax.barh(labels, values)
    ax.invert_yaxis()
    ax.set_xlabel("us per warpgroup of a CTA (mean over CTAs)")
    for row in rows:
        ax.plot([], [], " ", label=f"{row['case']} {row['kernel']}: busy {row['busy']:.1%}, "
                                   f"tail idle {row['tail_idle']:.1%}")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if jax.default_backend() != "gpu":
        print("trace_attention needs a GPU: the Mosaic kernels' profiler reads its clocks", file=sys.stderr)
        return 2
    selected = [c for c in cases.BENCH_CASES_FULL if c.name in args.cases]
    with tempfile.TemporaryDirectory() as scratch:
        trace_dir = args.trace_dir or pathlib.Path(scratch)
        rows = []
        for case in selected:
            for row in trace_case(case, args.mode, trace_dir, regions=args.regions,
                                  clock_ghz=args.clock_ghz):
                print(line(row), flush=True)
                rows.append(row)
    env = _bench.environment()
    stem = _bench.results_stem(f"attention-trace{'-' + args.label if args.label else ''}", env["device"],
                               env["date"])
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(mode=args.mode, jaxlib=jaxlib.__version__, **env, rows=rows)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(rows, args.out / f"{stem}.png",
         f"flash attention phases on {env['device']}, jax {env['jax']}, {env['date']}")
    print(f"wrote {args.out / stem}.json (and .png where a kernel was summarized)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
