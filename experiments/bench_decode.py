"""Decode benchmark: `python -m experiments.bench_decode [--smoke]`.

Sections (one JSON row each, `section` says which):
- copy: device stream bandwidth (y = x + 1 over a large bf16 buffer, read + write bytes).
- decode: ms/token of `generate` (greedy, weights cast to bf16 once) for each model, batch
  size and weight format, beside the roofline: bytes read per token (weights + the KV
  entries each step needs) / the copy bandwidth measured in the same run.
- speculative: greedy, the draft is the target's first layer(s) (`truncated_draft`); the
  target's later layers' output projections are scaled by s in [0, 1], so the acceptance rate
  alpha falls from 1 (s = 0: the target is its early exit) to ~0 (s = 1) while both costs stay
  fixed; measured tokens/round and speed-up against (1 - alpha^(gamma+1)) / (1 - alpha) and that
  over (gamma c + 1), c = draft/target ms/token. (Random weights: an unscaled 1-layer draft of a
  random 22-layer model almost never picks the target's argmax.)
- perplexity: fp32 / bf16 / int8 weights of a trained run on its corpus's validation split.
- kv: the serving engine's decode tokens/s with the paged KV pools in bf16 and in int8 (codes
  plus bf16 scales, (H + 2) / 2H of bf16's bytes), same model, slots and context, with the
  pools' bytes per position; ms are decode-only: (time to N new tokens - time to 1) medians.

Decode timings are wall clock (block_until_ready; the loop's host round-trips count); on a
GPU the batch-1 rows also carry `kernel_ms_per_token`, CUPTI's sum of kernel times, with the
launches per token, ms by kernel class and the costliest kernels per token (`kernels_per_token`).
ms/token = (time for N new tokens - time for 1) / (N - 1), so the prefill drops out.
Random weights (speed does not depend on them). `--smoke`: tiny models on a CPU in seconds.
Writes benchmarks/results/decode[-smoke]_<device>_<date>.json and .png.
"""
import argparse
import json
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from flax import nnx

from llmjax.config import DecodeConfig, load_config
from llmjax.data import load_dataset
from llmjax.decode import fused, generate, persistent, prepare_decode, speculative_generate
from llmjax.decode.generate import generate_program, lower_generate
from llmjax.decode.quantize import perplexity
from llmjax.decode.speculative import expected_tokens_per_round, truncated_draft
from llmjax.models import init_model
from pallas_kernels import _bench

RESULTS = pathlib.Path("benchmarks/results")
SECTIONS = ("decode", "speculative", "perplexity", "kv")
SETTINGS = {
    "full": dict(smoke=False, models=["gpt2-small", "llama-1b", "llama3.2-1b"], prompt_len=128, new_tokens=256,
                 batches=[1, 4, 16, 64], spec_model="llama-1b", draft_layers=1,
                 later_layer_scales=[0.0, 0.05, 0.1, 0.2], copy_mib=1024, reps=5, ppl_windows=64,
                 kv_model="llama-1b", kv_slots=[16], kv_prompt_len=512, kv_new_tokens=64),
    "smoke": dict(smoke=True, models=["gpt2-tiny", "llama-tiny"], prompt_len=4, new_tokens=8, batches=[1, 2],
                  spec_model="llama-tiny", draft_layers=1, later_layer_scales=[0.0, 1.0], copy_mib=8, reps=3,
                  ppl_windows=4, kv_model="llama-tiny", kv_slots=[2], kv_prompt_len=8, kv_new_tokens=4),
}


def copy_bandwidth(mib: int, reps: int) -> dict:
    x = jnp.ones((mib << 20) // 2, jnp.bfloat16)
    seconds = _bench.median_seconds(jax.jit(lambda x: x + 1), [(x,)], max(reps, 5))
    return dict(section="copy", bytes=2 * x.nbytes, time_ms=seconds * 1e3, gbps=2 * x.nbytes / seconds / 1e9)


def bytes_per_token(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight except the gathered embedding rows (the
    table counts when it is the tied head), plus the KV entries of `context` positions."""
    cfg = model.cfg
    skip = {"pos_embed"} | (set() if cfg.tie_embeddings else {"embed"})
    weights = sum(x.size * x.dtype.itemsize for name, sub in model.params.items() if name not in skip
                  for x in jax.tree.leaves(sub))
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return weights + kv


def _prompt(batch, length, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, dtype=jnp.int32)


def _decode_config(s, layers: str) -> DecodeConfig:
    """Greedy decoding of s["new_tokens"] with the token loop's `layers`: "persistent", "fused"
    or "xla" (each where it applies)."""
    return DecodeConfig(max_new_tokens=s["new_tokens"], temperature=0.0, fused_matvec=layers == "fused",
                        persistent_step=layers == "persistent")


def ms_per_token(model, batch, s, *, kernels=False, layers="fused") -> dict:
    """Greedy decode speed of `model` (a DecodeModel): wall (and, if asked on a GPU, kernel) time."""
    prompt = _prompt(batch, s["prompt_len"], model.cfg.vocab_size)
    cfg = _decode_config(s, layers)

    def run(n):
        return generate(model, prompt, cfg, steps=n)

    steps = s["new_tokens"] - 1  # N and 1 new tokens share one compiled program
    out = dict(ms_per_token=(_bench.wall_seconds(lambda: run(s["new_tokens"]), s["reps"])
                             - _bench.wall_seconds(lambda: run(1), s["reps"])) / steps * 1e3)
    if kernels and _bench.timer_name() == "cupti":
        from jax.experimental.mosaic.gpu import profiler
        try:
            program, program_args = generate_program(model, prompt, cfg)
            long, short = (profiler.measure(program, aggregate=False)(*program_args(n))[1]
                           for n in (s["new_tokens"], 1))
            out.update(kernels_per_token(long, short, steps))
        except Exception as e:  # the wall-clock number stands without it
            out["kernel_error"] = _bench.error_text(e)
    return out


def kernels_per_token(long, short, steps: int, shown: int = 30) -> dict:
    """Per generated token, from the CUPTI kernel lists of a long and a one-token run of the same
    program: kernel ms, launches, ms by class, and the `shown` costliest kernels (name, ms per
    token, launches per token), so a launch-bound loop tells itself apart from a bandwidth one."""
    by_long, by_short = _bench.kernels_by_name(long), _bench.kernels_by_name(short)
    rows, by_class = [], {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, (ms, count) in by_long.items():
        ms0, count0 = by_short.get(name, (0.0, 0))
        rows.append((name, (ms - ms0) / steps, (count - count0) / steps))
        by_class[_bench.kernel_class(name)] += rows[-1][1]
    rows.sort(key=lambda r: -r[1])
    return {"kernel_ms_per_token": sum(r[1] for r in rows), "kernel_launches_per_token": sum(r[2] for r in rows),
            "kernel_ms_per_token_by_class": by_class,
            "top_kernels_per_token": [(n, round(ms, 4), round(c, 2)) for n, ms, c in rows[:shown]]}


def generate_hlo(model, s, layers="fused") -> str:
    """The compiled batch-1 generate program's HLO text."""
    prompt = _prompt(1, s["prompt_len"], model.cfg.vocab_size)
    lowered = lower_generate(model, prompt, _decode_config(s, layers))
    return lowered.compile().as_text()


def large_casts_and_copies(cfg, hlo_text: str) -> list[str]:
    """`convert` / `copy` / `dynamic-slice` instructions in a compiled generate program whose
    result is at least as large as the smallest per-layer weight: a per-step weight cast,
    layer-slice copy or KV-cache copy shows up here (CPU programs also convert bf16 dot operands
    to fp32)."""
    smallest = cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    found = []
    for dtype, dims, op in re.findall(r"= (\w+)\[([\d,]*)\]\S* (convert|copy|dynamic-slice)\(", hlo_text):
        if np.prod([int(d) for d in dims.split(",") if d]) >= smallest:
            found.append(f"{op} {dtype}[{dims}]")
    return found


def decode_rows(preset, s, bandwidth, hlo_dir: pathlib.Path | None = None) -> list[dict]:
    model = init_model(load_config(overrides=[f"preset={preset}"]).model)
    context = s["prompt_len"] + s["new_tokens"] / 2  # mean positions attended per step
    rows = []
    for weights in ("bf16", "int8"):
        dm = prepare_decode(model, int8=weights == "int8", dtype="bfloat16")
        for batch in s["batches"] if weights == "bf16" else [1]:
            # Where the persistent step and the fused matvec loop apply (batch 1), they are timed
            # beside XLA's layers (A/B).
            kinds = (("persistent",) if weights == "bf16" and persistent.applies(dm.cfg, batch) else ()) + (
                ("fused",) if fused.applies(dm.cfg, batch) else ()) + ("xla",)
            for layers in kinds:
                rows.append(_decode_row(dm, preset, weights, batch, layers, s, bandwidth, context, hlo_dir))
    return rows


def _decode_row(dm, preset, weights, batch, layers, s, bandwidth, context, hlo_dir) -> dict:
    """One decode row: ms/token of generate with `layers` ("persistent": one kernel a step,
    "fused": the fused matvec loop, "xla": the model's own layers) beside the roofline."""
    row = dict(section="decode", model=preset, weights=weights, batch=batch, layers=layers,
               weight_bytes=dm.weight_bytes,
               **ms_per_token(dm, batch, s, kernels=batch == 1, layers=layers))
    if batch == 1 and weights == "bf16":
        hlo = generate_hlo(dm, s, layers=layers)
        row["large_casts_and_copies"] = large_casts_and_copies(dm.cfg, hlo)
        if hlo_dir is not None:  # the whole program, to read which ops the token loop runs
            suffix = "" if layers == "xla" else f"-{layers}"
            (hlo_dir / f"generate-{preset}-b1{suffix}.hlo.txt").write_text(hlo)
    row["bytes_per_token"] = bytes_per_token(dm, batch, context)
    # What the step reads as implemented: attention scans every cache slot, masked.
    row["bytes_per_token_full_cache"] = bytes_per_token(dm, batch, s["prompt_len"] + s["new_tokens"])
    row["roofline_ms"] = row["bytes_per_token"] / (bandwidth * 1e9) * 1e3
    row["roofline_fraction"] = row["roofline_ms"] / row["ms_per_token"]
    row["tokens_per_s"] = batch / row["ms_per_token"] * 1e3
    print(f"decode {preset:11} {weights} {layers:10} batch {batch:3}: {row['ms_per_token']:.3f} ms/token, "
          f"roofline {row['roofline_ms']:.3f} ms ({row['roofline_fraction']:.0%}), "
          f"{row['tokens_per_s']:.0f} tokens/s"
          + (f", kernels {row['kernel_ms_per_token']:.3f} ms/token in "
             f"{row['kernel_launches_per_token']:.0f} launches" if "kernel_ms_per_token" in row else ""),
          flush=True)
    for name, ms, launches in row.get("top_kernels_per_token", [])[:12]:
        print(f"    {ms:8.4f} ms/token {launches:6.1f} launches/token  {name}")
    return row


def _damp_later_layers(model, keep: int, scale: float):
    """A copy of `model` whose blocks past the first `keep` have their output projections (wo,
    w_out) scaled by `scale`: at 0 the target computes what its `keep`-layer early exit does
    (alpha = 1), at 1 it is the random model (alpha ~ 0). Same shapes, so the same cost."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)
    for module, name in (("attn", "wo"), ("mlp", "w_out")):
        var = state["blocks"][module][name]
        var.set_value(var[...].at[keep:].multiply(scale))
    return nnx.merge(graphdef, state)


def speculative_rows(s, gamma) -> list[dict]:
    model = init_model(load_config(overrides=[f"preset={s['spec_model']}"]).model)
    keep = s["draft_layers"]
    target = prepare_decode(model, dtype="bfloat16")
    draft = prepare_decode(truncated_draft(model, keep), dtype="bfloat16")
    cost = ms_per_token(draft, 1, s)["ms_per_token"] / ms_per_token(target, 1, s)["ms_per_token"]
    prompt = _prompt(1, s["prompt_len"], target.cfg.vocab_size)
    cfg = DecodeConfig(max_new_tokens=s["new_tokens"], temperature=0.0)
    base = _bench.wall_seconds(lambda: generate(target, prompt, cfg), s["reps"])
    rows = []
    for scale in s["later_layer_scales"]:
        damped = _damp_later_layers(model, keep, scale)
        target = prepare_decode(damped, dtype="bfloat16")
        draft = prepare_decode(truncated_draft(damped, keep), dtype="bfloat16")
        result = speculative_generate(target, draft, prompt, cfg, gamma=gamma)
        seconds = _bench.wall_seconds(lambda: speculative_generate(target, draft, prompt, cfg, gamma=gamma).tokens,
                               s["reps"])
        alpha = result.acceptance_rate
        expected = expected_tokens_per_round(alpha, gamma)
        rows.append(dict(section="speculative", model=s["spec_model"], draft_layers=keep,
                         later_layer_scale=scale, gamma=gamma, alpha=alpha,
                         tokens_per_round=result.tokens_per_round, expected_tokens_per_round=expected,
                         draft_cost_ratio=cost, speedup=base / seconds,
                         predicted_speedup=expected / (gamma * cost + 1), time_ms=seconds * 1e3,
                         baseline_ms=base * 1e3))
        print(f"speculative later-layer scale {scale}: alpha {alpha:.3f}, {result.tokens_per_round:.2f} "
              f"tokens/round (formula {expected:.2f}), speed-up {base / seconds:.2f}x "
              f"(predicted {expected / (gamma * cost + 1):.2f}x, c={cost:.3f})", flush=True)
    return rows


def perplexity_rows(run_dir, s) -> list[dict]:
    """fp32 / bf16 / int8 perplexity of a trained run (or, for --smoke without one, a random tiny
    model on the bundled corpus: the code path, not a meaningful number)."""
    if run_dir and pathlib.Path(run_dir).exists():
        from llmjax.runs import load_run
        cfg, model, _ = load_run(run_dir)
        data = load_dataset(cfg.data.corpus, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.val_fraction)
        source = str(run_dir)
    elif s["smoke"]:
        model = init_model(load_config(overrides=["preset=gpt2-tiny", "model.vocab_size=8192"]).model)
        data = load_dataset("shakespeare", "bundled", 32, 0.05)
        source = "random gpt2-tiny (smoke)"
    else:
        return [dict(section="perplexity", skipped=f"no trained run at {run_dir!r} (pass --ppl-run)")]
    windows = data.val[: s["ppl_windows"]]
    row = dict(section="perplexity", source=source, windows=len(windows), seq_len=windows.shape[1] - 1)
    for name, kwargs in (("fp32", dict(dtype="float32")), ("bf16", dict(dtype="bfloat16")),
                         ("int8", dict(dtype="bfloat16", int8=True))):
        dm = prepare_decode(model, **kwargs)
        row[f"ppl_{name}"], row[f"weight_bytes_{name}"] = perplexity(dm, windows), dm.weight_bytes
    print(f"perplexity ({source}): fp32 {row['ppl_fp32']:.3f}, bf16 {row['ppl_bf16']:.3f}, "
          f"int8 {row['ppl_int8']:.3f}", flush=True)
    return [row]


def kv_rows(s, preset) -> list[dict]:
    """Engine decode tokens/s with bf16 and int8 KV pools for each slot count in kv_slots."""
    from llmjax.rag.kv_store import engine_decode_rate

    model = init_model(load_config(overrides=[f"preset={preset}"]).model)
    rows = []
    for slots in s["kv_slots"]:
        for kv_dtype in ("bfloat16", "int8"):
            rate = engine_decode_rate(model, kv_dtype, slots=slots, prompt_len=s["kv_prompt_len"],
                                      new_tokens=s["kv_new_tokens"], reps=s["reps"])
            # KV one decode step reads: every live position of every sequence, mid-generation.
            context = s["kv_prompt_len"] + s["kv_new_tokens"] / 2
            rows.append(dict(section="kv", model=preset, kv_dtype=kv_dtype, **rate,
                             kv_bytes_per_step=slots * context * rate["kv_bytes_per_token"]))
            base = rows[-2] if kv_dtype == "int8" else rows[-1]
            rows[-1]["speedup_vs_bf16"] = rows[-1]["tokens_per_s"] / base["tokens_per_s"]
            rows[-1]["bytes_vs_bf16"] = rows[-1]["kv_bytes_per_token"] / base["kv_bytes_per_token"]
            print(f"kv {preset} {kv_dtype:8} slots {slots:3}: {rate['tokens_per_s']:.0f} tokens/s "
                  f"(x{rows[-1]['speedup_vs_bf16']:.2f} vs bf16), {rate['kv_bytes_per_token']:.0f} B/position "
                  f"(x{rows[-1]['bytes_vs_bf16']:.3f})", flush=True)
    return rows


def plot(rows, path, title):
    """The panels the rows have data for, two a row: batch-1 ms/token against the roofline,
    tokens/s over batch sizes, speculative decoding against its formula, the kv engine."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["section"] == "decode"]
    ones = [r for r in decode if r["batch"] == 1]
    # Positive rates only: a CPU smoke run's difference of two short timings can be noise.
    positive = [r for r in decode if r["weights"] == "bf16" and r["tokens_per_s"] > 0
                and (r["batch"] > 1 or r["layers"] == "xla")]  # one line: XLA's layers at every batch
    spec = [r for r in rows if r["section"] == "speculative"]
    kv = [r for r in rows if r["section"] == "kv"]

    def batch_one(ax):
        x = np.arange(len(ones))
        ax.bar(x - 0.2, [r["ms_per_token"] for r in ones], 0.4, label="measured")
        ax.bar(x + 0.2, [r["roofline_ms"] for r in ones], 0.4, label="roofline")
        for i, r in enumerate(ones):
            ax.annotate(f"{r['roofline_ms'] / r['ms_per_token']:.0%}", (i - 0.2, r["ms_per_token"]),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [f"{r['model']}\n{r['weights']} {r['layers']}" for r in ones], fontsize=8)
        ax.set_ylabel("ms/token, batch 1 (% of roofline)")
        ax.set_ylim(0, 1.25 * max(r["ms_per_token"] for r in ones))
        ax.legend(loc="upper right", ncol=2)

    def batch_sweep(ax):
        for model in dict.fromkeys(r["model"] for r in positive):
            sweep = [r for r in positive if r["model"] == model]
            ax.plot([r["batch"] for r in sweep], [r["tokens_per_s"] for r in sweep], "o-", label=model)
        ax.set(xlabel="batch", ylabel="tokens/s (bf16)", xscale="log", yscale="log")
        ax.legend()

    gamma, cost = (spec[0]["gamma"], spec[0]["draft_cost_ratio"]) if spec else (None, None)
    alphas = np.linspace(0, 0.999, 100)
    formula = np.array([expected_tokens_per_round(a, gamma) for a in alphas]) if spec else None

    def spec_tokens(ax):
        ax.plot(alphas, formula, label=f"(1-a^(g+1))/(1-a), g={gamma}")
        ax.plot([r["alpha"] for r in spec], [r["tokens_per_round"] for r in spec], "o", label="measured")
        ax.set(xlabel="acceptance rate alpha", ylabel="tokens per target forward")
        ax.legend()

    def spec_speedup(ax):
        ax.plot(alphas, formula / (gamma * cost + 1), label=f"predicted, c={cost:.3f}")
        ax.plot([r["alpha"] for r in spec], [r["speedup"] for r in spec], "o", label="measured")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.set(xlabel="acceptance rate alpha", ylabel="speed-up over generate")
        ax.legend()

    def kv_panel(ax, key, scale, ylabel):
        for kv_dtype in ("bfloat16", "int8"):
            sweep = [r for r in kv if r["kv_dtype"] == kv_dtype]
            ax.plot([r["slots"] for r in sweep], [r[key] / scale for r in sweep], "o-", label=kv_dtype)
        ax.set(xlabel="slots (sequences decoding together)", ylabel=ylabel)
        ax.legend()

    panels = (([batch_one] if ones else []) + ([batch_sweep] if len({r["batch"] for r in positive}) > 1 else [])
              + ([spec_tokens, spec_speedup] if spec else [])
              + ([lambda ax: kv_panel(ax, "tokens_per_s", 1, f"engine tokens/s, {kv[0]['model']}"),
                  lambda ax: kv_panel(ax, "kv_bytes_per_step", 2**20, "KV MiB read per decode step")] if kv else []))
    if not panels:  # perplexity rows only: their numbers are in the JSON
        panels = [lambda ax: ax.text(0.5, 0.5, "no rows to plot (see the JSON)", ha="center", va="center")]
    columns = min(2, len(panels))
    lines = -(-len(panels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(6 * columns, 4.5 * lines), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, few tokens (CPU, seconds)")
    parser.add_argument("--models", nargs="+", help="presets for the decode rows (default: gpt2-small "
                        "llama-1b llama3.2-1b; --smoke: gpt2-tiny llama-tiny)")
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes of the bf16 decode rows "
                        "(default: 1 4 16 64; --smoke: 1 2)")
    parser.add_argument("--gamma", type=int, default=4, help="draft tokens per speculative round")
    parser.add_argument("--ppl-run", help="trained run for the perplexity rows (default runs/shakespeare, "
                        "skipped if absent)")
    parser.add_argument("--kv-model", help="preset for the kv rows (default llama-1b; --smoke: llama-tiny)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder")
    parser.add_argument("--hlo-dir", type=pathlib.Path,
                        help="also write each model's compiled batch-1 generate program here")
    args = parser.parse_args(argv)
    s = SETTINGS["smoke" if args.smoke else "full"]
    if args.gamma < 1:
        parser.error(f"--gamma {args.gamma}: the draft proposes at least 1 token a round")
    from llmjax.presets import PRESETS
    unknown = [m for m in (args.models or []) + ([args.kv_model] if args.kv_model else []) if m not in PRESETS]
    if unknown:
        parser.error(f"--models/--kv-model {unknown}: not presets; known: {', '.join(PRESETS)}")
    if args.ppl_run is not None and not pathlib.Path(args.ppl_run).is_dir():
        parser.error(f"--ppl-run {args.ppl_run}: no such run folder")
    if args.batches:
        if min(args.batches) < 1:
            parser.error(f"--batches {args.batches}: every batch size must be >= 1")
        s = dict(s, batches=args.batches)
    env = _bench.environment()
    parts = ["decode"] + (["smoke"] if args.smoke else []) + (args.models or []) + (
        args.sections if len(args.sections) < len(SECTIONS) else [])  # separate runs keep their files
    stem = _bench.results_stem("-".join(parts), env["device"], env["date"])
    args.out.mkdir(parents=True, exist_ok=True)

    def save(rows):  # after every section, so a run cut short keeps what it measured
        result = dict(**env, jaxlib=jaxlib.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), settings=s,
                      gamma=args.gamma, rows=rows)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
        plot(rows, args.out / f"{stem}.png", f"decode on {env['device']}, jax {jax.__version__}, {env['date']}")

    copy = copy_bandwidth(s["copy_mib"], s["reps"])
    print(f"copy bandwidth {copy['gbps']:.0f} GB/s", flush=True)
    rows = [copy]
    if args.hlo_dir:
        args.hlo_dir.mkdir(parents=True, exist_ok=True)
    sections = dict(decode=lambda: [r for preset in args.models or s["models"]
                                    for r in decode_rows(preset, s, copy["gbps"], args.hlo_dir)],
                    speculative=lambda: speculative_rows(s, args.gamma),
                    perplexity=lambda: perplexity_rows(args.ppl_run or "runs/shakespeare", s),
                    kv=lambda: kv_rows(s, args.kv_model or s["kv_model"]))
    for name in SECTIONS:
        if name in args.sections:
            rows += sections[name]()
            save(rows)
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
