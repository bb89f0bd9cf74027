"""Training throughput: `python -m experiments.bench_train --config FILE [key=value ...]`.

Times the real train step (llmjax.train.step.make_train_step, the one `experiments.train`
runs) on a fixed random batch: warm-up steps, then `--steps` steps dispatched back to back and
ended by one block_until_ready, so the host never waits inside the timed window. Reports
tokens/s, step time, MFU, memory, and on a GPU a kernel-time breakdown per step from a
jax.profiler trace of three steps: GEMMs ("matmul", whichever layer they serve), attention
kernels and their glue, then the other kernels by the model part their fusion came from (loss,
norm, mlp activations, residual adds, optimizer, other; `MODEL_PARTS`), and the gaps between
kernels (`--show-kernels` lists the costliest kernels).

MFU = tokens/s x (6N + 12·L·d·T) / peak, N the matmul weights (PaLM appendix B). Two peaks are
stated: the vendor's dense bf16 figure (989 TFLOP/s on an H100 SXM) and the bf16 matmul ceiling
measured in the same run (an 8192^3 XLA matmul), the peak the torch peer divides by.

`--variants "a=1,b=2;c=3"` times several override sets of the same config in one process
(each against the first), to measure one change at a time. `--torch-peer PATH` runs
PATH (the nanoGPT + torch.compile script of ../shared/peers) first in a subprocess and puts
its tokens/s beside ours. Writes benchmarks/results/train-<config>_<device>_<date>.json and .png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from llmjax.config import load_config
from llmjax.models import count_params, init_model, split_model
from llmjax.train.flops import device_peak_flops, flops_per_token
from llmjax.train.optimizer import lr_schedule, make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from pallas_kernels import _bench

RESULTS = pathlib.Path("benchmarks/results")
def matmul_ceiling(n: int = 8192, reps: int = 10) -> float | None:
    """bf16 FLOP/s of an n^3 XLA matmul on this device (None on a CPU: not meaningful)."""
    if jax.default_backend() != "gpu":
        return None
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    jax.block_until_ready(mm(a))
    start = time.perf_counter()
    for _ in range(reps):
        out = mm(a)
    jax.block_until_ready(out)
    return 2 * n**3 * reps / (time.perf_counter() - start)


# The model part of a kernel that is neither a GEMM nor attention, from the Python frames XLA
# keeps for its fusion (`_bench.hlo_source_frames`): the innermost frame that a rule names
# decides. Rules: (part, function names, source path fragments).
MODEL_PARTS = (
    ("loss", ("lm_loss", "Transformer.head_loss"), ("pallas_kernels/cross_entropy/",)),
    ("norm", ("Norm.__call__", "Norm.add"), ("pallas_kernels/norms/",)),  # Norm.add: the residual add too
    ("attention", ("Attention.__call__", "Attention.project_qkv"), ("pallas_kernels/flash_attention/",)),
    ("mlp", ("FeedForward.__call__",), ("llmjax/models/moe.py", "pallas_kernels/grouped_matmul/")),
    ("optimizer", (), ("/optax/", "llmjax/train/optimizer.py")),
    ("residual", ("Block.__call__",), ()),
)
# Pallas Triton kernels run under their own names, which no fusion carries.
PALLAS_KERNEL_PARTS = (("norm", "norm"), ("cross_entropy", "loss"))


def model_part(frames) -> str:
    """The MODEL_PARTS part of a fusion's frames [(file, function)], innermost first; "other"
    if no rule names any of them (embedding, gradient clipping's norm outside optax, ...)."""
    for file, function in frames:
        for part, functions, paths in MODEL_PARTS:
            if function in functions or any(path in file for path in paths):
                return part
    return "other"


def kernel_part(name: str, frames_by_kernel: dict) -> str:
    """matmul / attention by the kernel's name (any model part's GEMM is "matmul"), else the
    model part of the fusion it runs (or of a Pallas kernel by its name), else "other"."""
    kind = _bench.kernel_class(name)
    if kind != "other":
        return kind
    if name in frames_by_kernel:
        return model_part(frames_by_kernel[name])
    return next((part for key, part in PALLAS_KERNEL_PARTS if key in name.lower()), "other")


def kernel_breakdown(step, state, batch, frames_by_kernel, n_steps: int = 3) -> tuple[dict, list, object]:
    """GPU kernel time per step from a jax.profiler trace of n_steps real steps (donating, back
    to back): (ms by `kernel_part` plus "gaps", the 25 costliest kernels as (name, ms,
    launches) per step, new state); see `_bench.timeline_breakdown`."""
    holder = [state]

    def run():
        for _ in range(n_steps):
            holder[0], _ = step(holder[0], batch)
        jax.block_until_ready(holder[0])

    ms, top = _bench.timeline_breakdown(_bench.traced_gpu_kernels(run), n_steps,
                                        classify=lambda name: kernel_part(name, frames_by_kernel))
    return ms, top, holder[0]


def bench_one(cfg, steps: int, warmup: int, breakdown: bool, hlo_path: pathlib.Path | None = None) -> dict:
    """Compile and time cfg's train step; returns one result row. hlo_path: where to write the
    compiled program's HLO text (to read which fusions the kernel breakdown names)."""
    tc, mc = cfg.train, cfg.model
    graphdef, params = split_model(init_model(mc, seed=tc.seed))
    n_params = count_params(params)
    optimizer = make_optimizer(cfg.optim, tc.steps)
    step = make_train_step(graphdef, optimizer, lr_schedule(cfg.optim, tc.steps))
    state = init_train_state(params, optimizer)
    del params
    seq = cfg.data.seq_len
    shape = (tc.grad_accum, tc.batch_size // tc.grad_accum, seq + 1)
    batch = jax.random.randint(jax.random.key(1), shape, 0, mc.vocab_size, jnp.int32)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()  # jit's call reuses this compile
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    breakdown = breakdown and jax.default_backend() == "gpu"
    hlo_text = compiled.as_text() if hlo_path or breakdown else ""
    if hlo_path:
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        hlo_path.write_text(hlo_text)
    del compiled
    losses = []
    for _ in range(warmup):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / steps
    losses = [float(x) for x in jax.device_get(losses)]
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss while benchmarking: {losses}")

    tokens = tc.batch_size * seq
    row = dict(n_params=n_params, batch=tc.batch_size, seq_len=seq, grad_accum=tc.grad_accum,
               step_ms=seconds * 1e3, tokens_per_s=tokens / seconds, compile_s=compile_s,
               flops_per_token=flops_per_token(mc, n_params, seq), first_loss=losses[0],
               last_loss=losses[-1],
               compiled_bytes=dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                                   temp=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes))
    if breakdown:
        ms, top, state = kernel_breakdown(step, state, batch, _bench.hlo_source_frames(hlo_text))
        row["kernel_ms"], row["top_kernels"] = ms, top
    stats = jax.devices()[0].memory_stats() or {}
    row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return row


def run_torch_peer(path: str) -> list[dict]:
    """Run the torch.compile peer script; returns its rows ([] with a message if it fails).
    A .json path is the results file of a peer run made before (the script's argument), so one
    peer run serves several configs benchmarked on the same machine."""
    if path.endswith(".json"):
        try:
            rows = json.loads(pathlib.Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"torch peer results {path} unreadable: {e}")
            return []
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
            print(f"torch peer results {path} are not a list of rows with a 'name' (the peer script's output)")
            return []
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "peer.json"
        proc = subprocess.run([sys.executable, path, str(out)], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode or not out.exists():
            print(f"torch peer failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
            return []
        return json.loads(out.read_text())


def kernel_lines(top) -> list[str]:
    """`--show-kernels` lines of a row's top_kernels (name, ms, launches), both per step: a
    launch count can be fractional (a kernel some steps run and others do not)."""
    return [f"    {ms:8.2f} ms {count:7.2f}x  {name}" for name, ms, count in top]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML (e.g. experiments/configs/gpt2-124m-h100.yaml)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--variants", default="", help="';'-separated override sets, each 'k=v,k=v', timed after the base")
    p.add_argument("--torch-peer", default=None, help="path of the torch peer script to run first, or of "
                   "the .json results its run wrote")
    p.add_argument("--peer-name", default=None, help="name of the peer's row to compare with (default: the "
                   "row whose name begins the config's, gpt2-124M for gpt2-124m-h100)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the traced kernel breakdown")
    p.add_argument("--show-kernels", action="store_true", help="print each variant's costliest kernels")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--hlo-dir", type=pathlib.Path, help="write each variant's compiled HLO text here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.steps < 1 or args.warmup < 1:
        p.error(f"--steps and --warmup must be >= 1; got {args.steps}, {args.warmup}")
    return args


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["variant"] for r in rows] + ([result["peer"]["name"]] if result.get("peer") else [])
    tok = [r["tokens_per_s"] / 1e3 for r in rows] + ([result["peer"]["tok_s"] / 1e3] if result.get("peer") else [])
    breakdown = any("kernel_ms" in r for r in rows)  # traced (a GPU, no --no-breakdown)
    fig, axes = plt.subplots(1, 2 if breakdown else 1, figsize=(12 if breakdown else 6.5, 4), squeeze=False)
    axes = axes[0]
    colors = ["C0"] * len(rows) + ["C3"] * (len(names) - len(rows))
    axes[0].barh(names, tok, color=colors)
    axes[0].set_xlabel("k tokens/s")
    axes[0].set_title("throughput (red: torch.compile peer)")
    if breakdown:
        left = np.zeros(len(rows))
        for part in dict.fromkeys(k for r in rows for k in r.get("kernel_ms", {})):
            vals = np.array([r.get("kernel_ms", {}).get(part, 0.0) for r in rows])
            axes[1].barh([r["variant"] for r in rows], vals, left=left, label=part)
            left += vals
        axes[1].set_xlabel("ms per step")
        axes[1].set_title("kernel time per step (profiler trace)")
        axes[1].legend(fontsize=8)
    fig.suptitle(f"{result['config']} on {result['device']}, jax {result['jax']}, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def matching_peer(peer_rows: list[dict], name: str | None, config_name: str) -> dict | None:
    """The peer's row to compare with: the one named `name`, else the longest whose name begins
    the config's at a '-' (gpt2-350M for gpt2-350m-h100; not gpt2-3); None, with a message, where
    none matches."""
    names = [r["name"] for r in peer_rows]
    if name is not None:
        if name not in names:
            raise SystemExit(f"--peer-name {name!r} is not a row of the peer's results; it has {names}")
        return peer_rows[names.index(name)]
    config = config_name.lower()
    found = [r for r in peer_rows if (config + "-").startswith(r["name"].lower() + "-")]  # whole words
    if not found:
        print(f"torch peer: no row matches config {config_name!r} (rows {names}); pass --peer-name")
        return None
    return max(found, key=lambda r: len(r["name"]))


def main(argv=None):
    args = parse_args(argv)
    peer_rows = run_torch_peer(args.torch_peer) if args.torch_peer else []
    peer = matching_peer(peer_rows, args.peer_name, pathlib.Path(args.config).stem) if peer_rows else None
    device = jax.devices()[0].device_kind
    ceiling = matmul_ceiling()
    spec_peak = device_peak_flops()
    variant_sets = [("base", [])] + [(v.strip(), [o for o in v.split(",") if o.strip()])
                                     for v in args.variants.split(";") if v.strip()]
    rows = []
    for name, extra in variant_sets:
        cfg = load_config(args.config, list(args.overrides) + extra)
        try:
            hlo = args.hlo_dir / f"train-{cfg.name}-{re.sub(r'[^A-Za-z0-9.=_-]+', '_', name)}.hlo.txt" if args.hlo_dir else None
            row = bench_one(cfg, args.steps, args.warmup, not args.no_breakdown, hlo)
        except Exception as e:  # one failing variant (e.g. out of memory) keeps the others
            traceback.print_exc()
            row = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        row["variant"] = name
        if "tokens_per_s" in row:
            flops = row["tokens_per_s"] * row["flops_per_token"]
            row["mfu_spec"] = flops / spec_peak if spec_peak else None
            row["mfu_measured_peak"] = flops / ceiling if ceiling else None
        rows.append(row)
        print(_line(row), flush=True)
        if args.show_kernels:
            print("\n".join(kernel_lines(row.get("top_kernels", []))))

    if peer:
        for r in rows:
            if "tokens_per_s" in r:
                r["vs_torch"] = r["tokens_per_s"] / peer["tok_s"]
        print(f"torch peer {peer['name']}: {peer['tok_s']:,.0f} tok/s; ours/peer: "
              + ", ".join(f"{r['variant']} {r['vs_torch']:.2f}x" for r in rows if "vs_torch" in r))
    date = datetime.date.today().isoformat()
    config_name = pathlib.Path(args.config).stem
    result = dict(config=config_name, overrides=args.overrides, device=device, jax=jax.__version__,
                  jaxlib=jaxlib.__version__, date=date, spec_peak_flops=spec_peak,
                  measured_matmul_flops=ceiling, rows=rows, peer=peer, peer_rows=peer_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / _bench.results_stem(f"train-{config_name}", device, date)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    if any("tokens_per_s" in r for r in rows):
        plot(result, stem.with_suffix(".png"))
    print(f"matmul ceiling {ceiling / 1e12:.0f} TFLOP/s" if ceiling else "matmul ceiling: not measured (no GPU)")
    print(f"wrote {stem}.json and .png")
    return 0 if all("tokens_per_s" in r for r in rows) else 1


def _line(row) -> str:
    if "error" in row:
        return f"{row['variant']:<28} error: {row['error']}"
    mfu = row.get("mfu_measured_peak") or row.get("mfu_spec")
    brk = row.get("kernel_ms")
    parts = " ".join(f"{k} {v:.1f}" for k, v in brk.items()) if brk else ""
    return (f"{row['variant']:<28} {row['step_ms']:8.1f} ms/step {row['tokens_per_s']:>10,.0f} tok/s"
            + (f"  MFU {100 * mfu:5.1f}%" if mfu else "")
            + f"  temp {row['compiled_bytes']['temp'] / 2**30:.2f} GiB  loss {row['first_loss']:.3f}->{row['last_loss']:.3f}"
            + (f"  [ms: {parts}]" if parts else ""))


if __name__ == "__main__":
    sys.exit(main())
