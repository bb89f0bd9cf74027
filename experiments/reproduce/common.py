"""What every claim shares: the paper-vs-ours comparison line, the environment, JSON + PNG output.

A claim module defines `run(small: bool) -> dict` (JSON-able, with a "comparisons" list made
by `compare`) and `plot(result, path)`; `write` saves both under runs/reproduce/<claim>/.
"""
import datetime
import json
from pathlib import Path

import jax
import numpy as np

TOLERANCE = 0.10  # ours disagrees with the paper when |ours / paper - 1| exceeds this
RESULTS_DIR = Path("runs/reproduce")


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def environment() -> dict:
    """Where and when it ran."""
    return dict(device=f"{jax.device_count()} x {jax.devices()[0].device_kind}", jax=jax.__version__,
                date=datetime.date.today().isoformat())


def compare(what: str, paper: float, ours: float, *, source: str, why: str = "", why_low: str = "",
            why_high: str = "") -> dict:
    """One row of the paper-vs-ours table. The reason printed when ours is off by more than
    TOLERANCE: `why_low` when ours is below the paper's, `why_high` when above, else `why`."""
    ratio = ours / paper if paper else float("nan")
    agrees = bool(abs(ratio - 1.0) <= TOLERANCE)
    reason = (why_low if ratio < 1 else why_high) or why
    return dict(what=what, paper=float(paper), ours=float(ours), ratio=float(ratio), agrees=agrees,
                source=source, why="" if agrees else reason)


def format_comparisons(rows: list[dict]) -> str:
    """The printed table: paper, ours, ratio, and a DISAGREES line with the reason where off."""
    width = max(len(r["what"]) for r in rows)
    lines = [f"{'claim':<{width}} {'paper':>12} {'ours':>12} {'ours/paper':>10}"]
    for r in rows:
        lines.append(f"{r['what']:<{width}} {r['paper']:12.4g} {r['ours']:12.4g} {r['ratio']:10.3f}"
                     f"  [{r['source']}]")
        if not r["agrees"]:
            lines.append(f"  DISAGREES by {abs(r['ratio'] - 1):.0%} (> {TOLERANCE:.0%}): "
                         f"{r['why'] or 'no known reason'}")
    return "\n".join(lines)


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x: the exponent of a power law y ~ x^slope."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def write(claim: str, result: dict, plot, out: Path | str | None = None) -> tuple[Path, Path]:
    """Save the result as JSON and its plot as PNG: under the folder `out` as result.json and
    <claim>.png (default runs/reproduce/<claim>/), or, when `out` ends in .json, at that path
    and beside it with .png (the layout of benchmarks/results/reproduce/). Returns both paths."""
    out = Path(out) if out else RESULTS_DIR / claim
    json_path, png_path = (out, out.with_suffix(".png")) if out.suffix == ".json" else \
        (out / "result.json", out / f"{claim}.png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"claim": claim, **environment(), **result}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(result, plt)
    fig.suptitle(f"{claim}: {environment()['device']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return json_path, png_path
