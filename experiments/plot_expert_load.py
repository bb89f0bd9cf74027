"""Expert load over training, from a run's metrics.jsonl: `python -m experiments.plot_expert_load
runs/<name> [--out file.png]`.

Top: each expert's share of the token->expert assignments (mean over layers) against the step,
with the uniform share 1/E dashed. Bottom (when the log has per-layer loads): each layer's
imbalance, its busiest expert's share times E (1 = balanced). Writes runs/<name>/expert_load.png.
"""
import argparse
import json
import pathlib
import sys

import numpy as np


def load_history(run_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(steps [N], load [N, E], per-layer load [N, L, E] or None) from the lines of
    `run_dir/metrics.jsonl` that carry `expert_load`.

    Raises:
      FileNotFoundError: no metrics.jsonl in run_dir.
      ValueError: no line has `expert_load` (not an MoE run, or nothing logged yet).
    """
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "expert_load" in r]
    if not records:
        raise ValueError(f"{path} has no expert_load metrics: is model.n_experts > 0 in that run?")
    steps = np.array([r["step"] for r in records])
    load = np.array([r["expert_load"] for r in records])
    layers = (np.array([r["expert_load_layers"] for r in records])
              if all("expert_load_layers" in r for r in records) else None)
    return steps, load, layers


def plot_expert_load(run_dir, out=None) -> pathlib.Path:
    """Draw the load history of run_dir (see the module docstring) to `out` (default
    run_dir/expert_load.png) and return the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, load, layers = load_history(run_dir)
    n_experts = load.shape[1]
    fig, axes = plt.subplots(2 if layers is not None else 1, 1, figsize=(8, 7 if layers is not None else 4),
                             squeeze=False)
    ax = axes[0, 0]
    for e in range(n_experts):
        ax.plot(steps, load[:, e], label=f"expert {e}", lw=1)
    ax.axhline(1 / n_experts, color="k", ls="--", lw=1, label="uniform")
    ax.set_ylabel("share of assignments")
    ax.set_title("expert load (mean over layers)")
    ax.legend(fontsize=7, ncol=4)
    if layers is not None:
        ax = axes[1, 0]
        for layer in range(layers.shape[1]):
            ax.plot(steps, layers[:, layer].max(-1) * n_experts, label=f"layer {layer}", lw=1)
        ax.axhline(1, color="k", ls="--", lw=1)
        ax.set_ylabel("busiest expert's share x E")
        ax.set_title("imbalance per layer (1 = balanced)")
        ax.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    out = pathlib.Path(out) if out else pathlib.Path(run_dir) / "expert_load.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.plot_expert_load",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot_expert_load(args.run_dir, args.out)}")
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
