"""Benchmark a kernel op: `python -m experiments.bench_kernels <op> [key=value ...]`.

<op> is a folder of pallas_kernels/ with a bench.py (`attention` means flash_attention). Its
`rows(**kwargs)` (or `--fn other`) returns one dict per (case, impl, mode) with `case`, `impl`,
`mode`, a throughput (`tflops` or `gbps`), `time_ms` or `error`, optionally `peer` (True for
the implementations we compare against; default: impl cudnn or xla) and `temp_bytes`.
key=value pairs are passed to that function (values parsed as Python literals when they can be),
e.g. `flash_attention preset=tune reps=30`.

Writes benchmarks/results/<op>[-<fn or preset>]_<device>_<date>.json (device, jax and jaxlib
versions, date, rows) and a .png beside it; prints a table ending in the ratio of each row to the
strongest peer of its (case, mode).
"""
import argparse
import ast
import datetime
import importlib
import json
import pathlib
import pkgutil
import sys

import jax
import jaxlib

import pallas_kernels
from pallas_kernels import _bench

ALIASES = {"attention": "flash_attention"}
METRICS = {"tflops": "TFLOP/s", "gbps": "GB/s"}
PEER_IMPLS = ("cudnn", "xla")
RESULTS = pathlib.Path("benchmarks/results")


def available_ops() -> list[str]:
    root = pathlib.Path(pallas_kernels.__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(root)])
                  if m.ispkg and (root / m.name / "bench.py").exists())


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_kernels",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("op", help=f"one of {available_ops()} (or 'attention')")
    parser.add_argument("--fn", default="rows", help="function of <op>.bench returning rows")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    parser.add_argument("options", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    args.op = ALIASES.get(args.op, args.op)
    if args.op not in available_ops():
        parser.error(f"op={args.op!r} has no bench.py; use one of {available_ops()}")
    bad = [o for o in args.options if "=" not in o]
    if bad:
        parser.error(f"options must be key=value; got {bad}")
    args.kwargs = {k: _literal(v) for k, v in (o.split("=", 1) for o in args.options)}
    return args


def metric_of(rows) -> str:
    for key in METRICS:
        if any(key in r for r in rows):
            return key
    raise ValueError(f"rows carry none of the metrics {tuple(METRICS)}")


def is_peer(row) -> bool:
    return row.get("peer", row["impl"].split("[")[0] in PEER_IMPLS)


def add_peer_ratios(rows, metric):
    """Each row gets `vs_peer`: its metric over the strongest peer's in the same (case, mode)."""
    best = {}
    for r in rows:
        if is_peer(r) and r.get(metric) is not None:
            key = (r["case"], r["mode"])
            if r[metric] > best.get(key, (0.0, ""))[0]:
                best[key] = (r[metric], r["impl"])
    for r in rows:
        value, peer = best.get((r["case"], r["mode"]), (None, None))
        r["best_peer"] = peer
        r["vs_peer"] = r[metric] / value if value and r.get(metric) is not None else None


def table(rows, metric) -> str:
    head = (f"{'case':<22} {'mode':<8} {'impl':<36} {'ms':>9} {METRICS[metric]:>9} "
            f"{'temp MiB':>9}  vs best peer")
    lines = [head, "-" * len(head)]
    for r in rows:
        temp = f"{r['temp_bytes'] / 2**20:9.1f}" if r.get("temp_bytes") is not None else f"{'':9}"
        if r.get("error"):
            lines.append(f"{r['case']:<22} {r['mode']:<8} {r['impl']:<36} error: {r['error'][:80]}")
            continue
        ratio = f"{r['vs_peer']:.2f}x {r['best_peer']}" if r["vs_peer"] is not None else "-"
        lines.append(f"{r['case']:<22} {r['mode']:<8} {r['impl']:<36} {r['time_ms']:9.3f} "
                     f"{r[metric]:9.4g} {temp}  {ratio}")
    return "\n".join(lines)


def plot(rows, metric, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    case_names = list(dict.fromkeys(r["case"] for r in rows))
    with_memory = any(r.get("temp_bytes") is not None for r in rows)
    panels = [(m, metric) for m in modes] + ([(modes[-1], "temp_bytes")] if with_memory else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * len(case_names)), 3.5 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, (mode, key) in zip(axes[:, 0], panels):
        for i, impl in enumerate(impls):
            values = {r["case"]: r.get(key) for r in rows if r["mode"] == mode and r["impl"] == impl}
            heights = [(values.get(c) or 0) / (2**20 if key == "temp_bytes" else 1) for c in case_names]
            ax.bar([x + i * width for x in range(len(case_names))], heights, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(case_names))], case_names,
                      rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("XLA temp MiB" if key == "temp_bytes" else METRICS[key])
        ax.set_title(f"{mode}: {'scratch memory' if key == 'temp_bytes' else METRICS[key]}")
        if key == "temp_bytes":
            ax.set_yscale("symlog")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not over them
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    bench = importlib.import_module(f"pallas_kernels.{args.op}.bench")
    rows = getattr(bench, args.fn)(**args.kwargs)
    metric = metric_of(rows)
    add_peer_ratios(rows, metric)
    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    variant = args.kwargs.get("preset", args.fn if args.fn != "rows" else None)
    stem = _bench.results_stem(f"{args.op}{'-' + str(variant) if variant else ''}", device, date)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(op=args.op, fn=args.fn, options=args.kwargs, device=device, jax=jax.__version__,
                  jaxlib=jaxlib.__version__, date=date, timer=_bench.timer_name(), metric=METRICS[metric],
                  rows=rows)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(rows, metric, args.out / f"{stem}.png", f"{args.op} on {device}, jax {jax.__version__}, {date}")
    for name, draw in getattr(bench, "PLOTS", {}).items():  # extra figures an op asks for (roofline)
        draw(rows, args.out / f"{stem}-{name}.png", f"{args.op} {name} on {device}, jax {jax.__version__}, {date}")
    print(table(rows, metric))
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
