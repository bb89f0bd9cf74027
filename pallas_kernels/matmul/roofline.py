"""Roofline plot of matmul benchmark rows: TFLOP/s against arithmetic intensity (FLOPs per byte).

Attainable throughput is min(peak compute, intensity x memory bandwidth) (Williams, Waterman and
Patterson, "Roofline", CACM 2009). Ceilings are the device's datasheet numbers (dense tensor-core
bf16 and fp8, HBM bandwidth); a device missing from the table gets no ceilings.

`python -m pallas_kernels.matmul.roofline RESULTS.json` draws RESULTS-roofline.png beside it.
"""
import json
import pathlib
import sys

# device_kind prefix -> (bf16 dense TFLOP/s, fp8 dense TFLOP/s, HBM TB/s), datasheet values.
PEAKS = {
    "NVIDIA H100 80GB HBM3": (989.0, 1979.0, 3.35),  # SXM5
    "NVIDIA H100 PCIe": (756.0, 1513.0, 2.0),
    "NVIDIA H200": (989.0, 1979.0, 4.8),
}


def peaks(device: str):
    """(bf16 TFLOP/s, fp8 TFLOP/s, TB/s) for a device_kind, or None if unknown."""
    for prefix, values in PEAKS.items():
        if device.startswith(prefix):
            return values
    return None


def plot_roofline(rows, path, title=None):
    """Draw the rows that have `intensity` and `tflops` (one marker per impl and mode, log-log),
    with the compute ceilings and the bandwidth line of rows[0]'s device; save to `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("tflops") is not None and r.get("intensity")]
    if not points:
        raise ValueError("no row carries both tflops and intensity")
    device = points[0].get("device", "")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [r["intensity"] for r in points]
    lo, hi = min(xs) / 2, max(xs) * 2
    ceiling = peaks(device)
    if ceiling is not None:
        bf16, fp8, tbps = ceiling
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        for peak, name, style in ((bf16, "bf16", "-"), (fp8, "fp8", "--")):
            ax.plot(grid, [min(peak, x * tbps) for x in grid], "k" + style, lw=1,
                    label=f"roofline {name}: {peak:g} TFLOP/s, {tbps:g} TB/s")
    markers = {"xla": "o", "triton": "s", "mosaic": "^", "jax_triton": "D"}
    impls = list(dict.fromkeys(r["impl"] for r in points))
    for key in dict.fromkeys((r["impl"], r["mode"]) for r in points):
        impl, mode = key
        mine = [r for r in points if (r["impl"], r["mode"]) == key]
        color = f"C{impls.index(impl)}"
        ax.scatter([r["intensity"] for r in mine], [r["tflops"] for r in mine],
                   marker=markers.get(impl, "x"), edgecolors=color,
                   facecolors="none" if mode == "fp8" else color, label=f"{impl} {mode}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved by an ideal kernel)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title or f"matmul roofline, {device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pallas_kernels.matmul.roofline RESULTS.json", file=sys.stderr)
        return 2
    source = pathlib.Path(argv[0])
    result = json.loads(source.read_text())
    out = source.with_name(source.stem + "-roofline.png")
    plot_roofline(result["rows"], out, f"matmul on {result.get('device')}, jax "
                  f"{result.get('jax')}, {result.get('date')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
