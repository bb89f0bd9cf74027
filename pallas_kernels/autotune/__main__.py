"""Tune an op's kernels at its benchmark shapes: `python -m pallas_kernels.autotune <op> [key=value ...]`.

<op>: matmul, flash_attention (or attention), norms. Options (Python literals):
  cases=['m8192_n8192_k8192']   benchmark case names to tune (default: all of the op's)
  kernels=['matmul_mosaic']     table kernel names to tune (default: all)
  reps=10                       timed samples per candidate (CUPTI device time on a GPU)
  workers=8                     threads compiling a stage's candidates at once (1: one at a time)
  table='pallas_kernels/autotune/table.json'   the table to update
  out='benchmarks/results'      where the report goes
Each problem's winner is written to the table, and the JSON report rewritten, as soon as it is
known (an interrupted run keeps what it finished). The report, autotune-<op>_<device>_<date>.json and .png, lists every
candidate (time or the reason it was skipped) and default vs tuned time per shape and mode.
"""
import ast
import json
import pathlib
import sys

import jaxlib

from pallas_kernels import _bench
from pallas_kernels.autotune import spaces, table, tuner

ALIASES = {"attention": "flash_attention"}
OPTIONS = ("cases", "kernels", "reps", "workers", "table", "out")


def parse(argv):
    """(op, options dict); raises SystemExit with a usage line on bad input."""
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__)
    op = ALIASES.get(argv[0], argv[0])
    if op not in spaces.OPS:
        raise SystemExit(f"op={argv[0]!r} unknown; use one of {spaces.OPS}")
    options = dict(cases=None, kernels=None, reps=10, workers=tuner.default_workers(), table=None,
                   out="benchmarks/results")
    for item in argv[1:]:
        name, sep, text = item.partition("=")
        if not sep or name not in OPTIONS:
            raise SystemExit(f"option {item!r} must be key=value with key in {OPTIONS}")
        try:
            options[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[name] = text
    if not isinstance(options["workers"], int) or options["workers"] < 1:
        raise SystemExit(f"workers={options['workers']!r} must be an int >= 1")
    return op, options


def summary(results) -> str:
    """One line per (kernel, key, mode): default and tuned ms, speedup, the tuned fields."""
    lines = [f"{'kernel':<18} {'shape key':<48} {'mode':<10} {'default ms':>10} {'tuned ms':>9} "
             f"{'speedup':>7}  changed fields"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['kernel']:<18} {r['key']:<48} error: {r['error'][:90]}")
            continue
        changed = {k: v for k, v in r["best"].items() if r["default"].get(k) != v}
        for mode, default_ms in r["default_ms"].items():
            tuned_ms = r["tuned_ms"][mode]
            lines.append(f"{r['kernel']:<18} {r['key']:<48} {mode:<10} {default_ms:10.4f} "
                         f"{tuned_ms:9.4f} {default_ms / tuned_ms:6.2f}x  {changed or '(default)'}")
    return "\n".join(lines)


def plot(results, path, title):
    """Bars of default / tuned time (the speedup, >= 1 by construction) per shape and mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{r['kernel']} {r['key']} {mode}", r["default_ms"][mode] / r["tuned_ms"][mode])
            for r in results if "error" not in r for mode in r["default_ms"]]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(bars) + 1.5))
    ax.barh(range(len(bars)), [s for _, s in bars])
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=6)
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("speedup of the tuned config over the default (default ms / tuned ms)")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    op, options = parse(sys.argv[1:] if argv is None else argv)
    env = _bench.environment()
    out = pathlib.Path(options["out"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"autotune-{op}_{table.device_key()}_{env['date']}"
    results = []

    def save_report():
        report = dict(op=op, options=options, jaxlib=jaxlib.__version__, **env, results=results)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))

    save_report()  # written at once and after every problem: a run cut short keeps what it did
    for problem in spaces.problems(op, options["cases"], options["kernels"]):
        try:
            result = tuner.tune(problem, reps=options["reps"], workers=options["workers"])
        except Exception as e:  # the default itself cannot run: report it, tune the rest
            results.append(dict(kernel=problem.kernel, key=problem.key, error=_bench.error_text(e)))
            print(f"{problem.kernel} [{problem.key}]: {results[-1]['error']}")
        else:
            table.record([result], path=options["table"])
            results.append(result)
        save_report()
    plot(results, out / f"{stem}.png", f"autotune {op} on {env['device']}, {env['date']}")
    print(summary(results))
    print(f"wrote {out / stem}.json and .png; table {options['table'] or table.TABLE}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
