"""Serving benchmark: a synthetic trace through the continuous-batching engine.

`python -m experiments.serve_bench [--preset llama-tiny] [--requests 64 --rate 4 ...] [key=value ...]`

Requests arrive as a Poisson process (exponential gaps at --rate per second) with prompt and
output lengths drawn uniformly from ranges; a fraction share one of a few system-prompt-like
prefixes. Each variant (prefix caching on, off) serves the same trace in real time and
reports throughput, time-to-first-token (TTFT) and time-per-output-token (TPOT) percentiles,
the prefix-cache hit rate, and KV memory waste: the share of allocated KV slots holding no
token, with paging vs a contiguous cache that reserves max_seq_len slots per running sequence
(the PagedAttention comparison, Kwon et al. 2023 section 2.3). Random weights: the numbers are
about the system, not the text. Writes benchmarks/results/serve_bench-<preset>_<device>_<date>.json
and .png. key=value pairs override the model config (e.g. model.dtype=bfloat16).
"""
import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import re
import sys
import time

import jax
import jaxlib
import numpy as np

from llmjax.config import ConfigError, load_config
from llmjax.decode.engine import Engine, EngineConfig
from llmjax.models import init_model

RESULTS = pathlib.Path("benchmarks/results")
PERCENTILES = (50, 90, 99)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama-tiny", help="model preset (random weights)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-seq-len", type=int, default=512, help="the served context (overrides the preset's)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(64, 384), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 96), metavar=("MIN", "MAX"))
    p.add_argument("--prefix-len", type=int, default=64, help="tokens of each shared prefix")
    p.add_argument("--prefixes", type=int, default=4, help="distinct shared prefixes")
    p.add_argument("--shared-fraction", type=float, default=0.5, help="requests opening with a shared prefix")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=192)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--prefill-slots", type=int, default=2, help="prompts read (a chunk each) per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides may follow options
    bad = [f"--{name} {value}" for name, value, ok in (
        ("requests", args.requests, args.requests >= 1),
        ("rate", args.rate, math.isfinite(args.rate) and args.rate > 0),
        ("prompt-len", args.prompt_len, 1 <= args.prompt_len[0] <= args.prompt_len[1]),
        ("output-len", args.output_len, 1 <= args.output_len[0] <= args.output_len[1]),
        ("prefix-len", args.prefix_len, args.prefix_len >= 0),
        ("prefixes", args.prefixes, args.prefixes >= 1),
        ("shared-fraction", args.shared_fraction, 0 <= args.shared_fraction <= 1),
        ("temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0)) if not ok]
    if bad:
        p.error(f"{', '.join(bad)}: --requests and --prefixes must be >= 1, --rate a finite number > 0, "
                "--prompt-len and --output-len 1 <= MIN <= MAX, --prefix-len >= 0, --shared-fraction in [0, 1], "
                "--temperature a finite number >= 0")
    owned = [o for o in args.overrides if o.split("=")[0] in ("preset", "model.max_seq_len")]
    if owned:
        p.error(f"{owned}: give the model with --preset and the context with --max-seq-len")
    return args


def make_trace(args, vocab: int, context: int) -> list[dict]:
    """Requests with arrival offsets (s), prompts and output lengths; prompt + output fits."""
    rng = np.random.default_rng(args.seed)
    prefixes = [rng.integers(0, vocab, args.prefix_len).tolist() for _ in range(args.prefixes)]
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    trace = []
    for arrival in arrivals:
        n_out = int(rng.integers(args.output_len[0], args.output_len[1] + 1))
        n_prompt = min(int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1)), context - n_out)
        head = prefixes[rng.integers(len(prefixes))] if rng.random() < args.shared_fraction else []
        prompt = (head + rng.integers(0, vocab, n_prompt).tolist())[:max(n_prompt, 1)]
        trace.append(dict(arrival=float(arrival), prompt=prompt, max_new_tokens=n_out))
    return trace


def serve(model, engine_cfg, trace, temperature) -> dict:
    """Serve the trace in real time; returns per-request timings and per-step KV usage."""
    warm = Engine(model, engine_cfg)  # compile both step shapes before the clock starts
    warm.submit([1] * (engine_cfg.chunk_size + 1), 2)
    warm.run()
    engine, usage = Engine(model, engine_cfg), []
    start, pending, ids = time.perf_counter(), list(trace), []
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0]["arrival"] <= now:
            req = pending.pop(0)
            ids.append(engine.submit(req["prompt"], req["max_new_tokens"], {"temperature": temperature},
                                     arrival=start + req["arrival"]))
        if not engine.has_work():
            time.sleep(max(0.0, pending[0]["arrival"] - now))
            continue
        engine.step()
        usage.append(engine.kv_usage())
    elapsed = time.perf_counter() - start
    seqs = [engine.finished[i] for i in ids]
    return dict(elapsed=elapsed, steps=engine.steps, usage=usage, context=engine.context,
                ttft=[s.first_token_time - s.arrival for s in seqs],
                tpot=[(s.finish_time - s.first_token_time) / (len(s.generated) - 1)
                      for s in seqs if len(s.generated) > 1],
                generated=sum(len(s.generated) for s in seqs),
                prompt_tokens=sum(len(s.prompt) for s in seqs),
                cached_tokens=sum(s.cached_tokens for s in seqs),
                preemptions=sum(s.preemptions for s in seqs))


def summarize(name, run) -> dict:
    """One result row: throughput, latency percentiles (ms), KV waste paged vs contiguous."""
    usage = run["usage"]
    allocated = sum(u["allocated"] for u in usage)
    live = sum(u["live"] for u in usage)
    tokens = sum(u["tokens"] for u in usage)
    reserved = sum(u["running"] for u in usage) * run["context"]  # contiguous max-length slots
    row = dict(variant=name, requests=len(run["ttft"]), elapsed_s=run["elapsed"], steps=run["steps"],
               output_tok_per_s=run["generated"] / run["elapsed"],
               requests_per_s=len(run["ttft"]) / run["elapsed"],
               prefix_hit_rate=run["cached_tokens"] / run["prompt_tokens"],
               preemptions=run["preemptions"],
               kv_waste_paged=1 - live / allocated if allocated else 0.0,
               kv_waste_contiguous=1 - tokens / reserved if reserved else 0.0,
               kv_sharing_saving=1 - live / tokens if tokens else 0.0)
    for metric in ("ttft", "tpot"):
        for p in PERCENTILES:
            row[f"{metric}_p{p}_ms"] = float(np.percentile(run[metric], p)) * 1e3
    return row


def plot(runs, rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        for ax, metric in zip(axes[:2], ("ttft", "tpot")):
            values = np.sort(np.asarray(run[metric]) * 1e3)
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=name)
            ax.set_xlabel(f"{metric.upper()} (ms)")
            ax.set_ylabel("fraction of requests")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    name, run = next(iter(runs.items()))
    steps = np.arange(len(run["usage"]))
    axes[2].plot(steps, [u["running"] * run["context"] for u in run["usage"]], label="contiguous reserved")
    axes[2].plot(steps, [u["allocated"] for u in run["usage"]], label="paged allocated")
    axes[2].plot(steps, [u["live"] for u in run["usage"]], label="live KV")
    axes[2].set_xlabel(f"engine step ({name})")
    axes[2].set_ylabel("KV slots")
    waste = {r["variant"]: r for r in rows}[name]
    axes[2].set_title(f"waste: paged {waste['kv_waste_paged']:.1%}, "
                      f"contiguous {waste['kv_waste_contiguous']:.1%}", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(overrides=[f"preset={args.preset}", f"model.max_seq_len={args.max_seq_len}",
                                    *args.overrides])
        engine_cfg = EngineConfig(max_slots=args.slots, prefill_slots=args.prefill_slots,
                                  chunk_size=args.chunk_size, block_size=args.block_size,
                                  num_blocks=args.num_blocks)
        model = init_model(cfg.model, seed=args.seed)
        context = (cfg.model.max_seq_len // args.block_size) * args.block_size
        trace = make_trace(args, cfg.model.vocab_size, context)
        runs = {name: serve(model, dataclasses.replace(engine_cfg, prefix_caching=on), trace, args.temperature)
                for name, on in (("prefix_cache", True), ("no_prefix_cache", False))}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [summarize(name, run) for name, run in runs.items()]
    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    stem = f"serve_bench-{args.preset}_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}_{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    options = {k: v for k, v in vars(args).items() if k != "out"}
    result = dict(bench="serve_bench", options=options, engine=dataclasses.asdict(engine_cfg),
                  model=dataclasses.asdict(cfg.model), device=device, jax=jax.__version__,
                  jaxlib=jaxlib.__version__, date=date, rows=rows)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(runs, rows, args.out / f"{stem}.png", f"serve_bench {args.preset} on {device}, jax {jax.__version__}, {date}")
    for row in rows:
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
