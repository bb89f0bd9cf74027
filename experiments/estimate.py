"""How many GPUs, hours and bytes to train a model: `python -m experiments.estimate --params 100e9
--tokens 2e12 --gpu h100 [--gpus 1024] [--mfu 0.4]`, or `--model gpt3-175b` (the GPT-3 family).

Pure arithmetic, with every formula printed: training FLOPs 6·Ψ·D + 12·L·d·T·D (Kaplan et
al. 2020; PaLM appendix B for the attention term), GPU-hours at a given MFU, and bytes per
device for each ZeRO stage x tensor x pipeline layout (sharding.memory's closed forms),
ending with the smallest layout that fits; then the layout search's cost model on paper
(`sharding.search`: our presets x mesh factorizations x remat, pruned by memory, ranked by
compute / MFU + communication / link bandwidth + pipeline bubble) for one global batch.

Ψ params, D tokens, L layers, d d_model, T sequence length, t tensor size, p pipeline size,
N data-parallel (ZeRO) shards = gpus / (t·p) (the ZeRO paper's letters).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from llmjax.train.flops import PEAK_BF16_FLOPS
from sharding import search
from sharding.memory import ZERO_STAGES, activation_bytes_per_layer, zero_bytes_per_param, zero_formula

# --gpu name -> (device_kind prefix in llmjax.train.flops, memory in bytes from the datasheet).
GPUS = {"h100": ("NVIDIA H100", 80e9), "h200": ("NVIDIA H200", 141e9),
        "a100": ("NVIDIA A100", 80e9), "l4": ("NVIDIA L4", 24e9)}
TENSOR_SIZES = (1, 2, 4, 8)  # within one NVLink node

# The GPT-3 family (Brown et al. 2020, table 2.1): n_params, n_layers, d_model, n_heads, and
# the batch in sequences of 2048 (the table's 0.5M / 1M / 2M / 3.2M tokens, rounded to 256 /
# 512 / 1024 / 1536 sequences so that power-of-two meshes divide it); d_mlp = 4·d_model,
# vocab 50257. Where the table disagrees with itself we keep d_model and d_head: 13B's d_model
# is 5120 (40 heads x 128; the table prints 5140), 1.3B has 16 heads of 128 (it prints 24).
GPT3 = {
    "gpt3-125m": (125e6, 12, 768, 12, 256), "gpt3-350m": (350e6, 24, 1024, 16, 256),
    "gpt3-760m": (760e6, 24, 1536, 16, 256), "gpt3-1.3b": (1.3e9, 24, 2048, 16, 512),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 512), "gpt3-6.7b": (6.7e9, 32, 4096, 32, 1024),
    "gpt3-13b": (13e9, 40, 5120, 40, 1024), "gpt3-175b": (175e9, 96, 12288, 96, 1536),
}
GPT3_CONTEXT, GPT3_TOKENS = 2048, 300e9  # every GPT-3 model was trained on 300B tokens
PIPELINE_SIZES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A dense decoder's size: what the FLOP and memory formulas need."""

    n_params: float
    n_layers: int
    d_model: int
    n_heads: int


def infer_shape(n_params: float, n_layers: int | None = None, d_model: int | None = None,
                head_dim: int = 128) -> Shape:
    """A plausible dense shape for `n_params`: N ≈ 12·L·d² with d/L ≈ 128 (GPT-3 175B:
    12288/96), d a multiple of `head_dim`; `n_layers` / `d_model` when given win."""
    if d_model is None:
        d = (n_params / n_layers / 12) ** 0.5 if n_layers else (n_params * 128 / 12) ** (1 / 3)
        d_model = max(head_dim, round(d / head_dim) * head_dim)
    if n_layers is None:  # a multiple of 8 where possible, so pipelines of 2-8 stages divide it
        layers = n_params / (12 * d_model ** 2)
        n_layers = max(1, round(layers / 8) * 8 if layers >= 8 else round(layers))
    return Shape(n_params, n_layers, d_model, max(1, d_model // head_dim))


def train_flops(shape: Shape, tokens: float, seq_len: int) -> tuple[float, float]:
    """(dense, attention) training FLOPs: 6·Ψ·D and 12·L·d·T·D."""
    return 6 * shape.n_params * tokens, 12 * shape.n_layers * shape.d_model * seq_len * tokens


@dataclasses.dataclass(frozen=True)
class Layout:
    """One ZeRO stage x tensor x pipeline x data split and its bytes per device."""

    stage: int
    tensor: int
    pipeline: int
    data: int
    states: float  # params + grads + optimizer state, bytes per device
    activations: float  # bytes per device

    @property
    def total(self) -> float:
        return self.states + self.activations


def layouts(shape: Shape, gpus: int, seq_len: int, micro_batch: int, recompute: bool) -> list[Layout]:
    """Every ZeRO stage x tensor x pipeline layout of `gpus` devices the shape allows.

    States: Ψ/(t·p) params per device at `zero_bytes_per_param(stage, n)`. Activations:
    1F1B keeps p micro-batches in flight on the first stage, each through L/p layers, so L
    layers' worth of one micro-batch on every layout (plus one layer's full set while
    recomputing); tensor parallel uses sequence parallel (Korthikanti et al. 2022).
    """
    rows = []
    for tp in TENSOR_SIZES:
        for pp in PIPELINE_SIZES:
            if gpus % (tp * pp) or shape.n_heads % tp or shape.n_layers % pp:
                continue
            per_layer = lambda remat: activation_bytes_per_layer(  # noqa: E731
                micro_batch, seq_len, shape.d_model, shape.n_heads, tensor=tp,
                sequence_parallel=tp > 1, flash=True, recompute=remat)
            acts = shape.n_layers * per_layer(recompute) + (per_layer(False) if recompute else 0)
            for stage in ZERO_STAGES:
                dp = gpus // (tp * pp)
                states = shape.n_params / (tp * pp) * zero_bytes_per_param(stage, dp)
                rows.append(Layout(stage, tp, pp, dp, states, acts))
    return rows


def pipeline_bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe or 1F1B schedule, (p-1)/(m+p-1) (Huang et al. 2019; equal
    forward and backward slots, as `sharding.pipeline.schedule_stats` measures)."""
    return (stages - 1) / (microbatches + stages - 1)


def smallest_fitting(rows: list[Layout], memory: float) -> Layout | None:
    """The fitting layout with the fewest model-parallel devices (t·p), then the lowest ZeRO
    stage, then the smaller t: the least communication per step."""
    fits = [r for r in rows if r.total <= memory]
    return min(fits, key=lambda r: (r.tensor * r.pipeline, r.stage, r.tensor), default=None)


@dataclasses.dataclass(frozen=True)
class PaperModel:
    """A dense GPT-style model on paper: the `ModelConfig` attributes the cost and memory
    models read (bf16 compute, fp32 master params, GELU MLP 4·d, full attention heads; the
    GPT-2 vocabulary padded from 50257 to 51200 so tensor splits divide it, as Megatron-LM
    pads it)."""

    n_layers: int
    d_model: int
    n_heads: int
    max_seq_len: int
    vocab_size: int = 51200
    family: str = "gpt2"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # a flash kernel on the GPU: no [B, N, T, T] scores kept
    loss_impl: str = "fused"  # chunked cross-entropy: no whole [tokens, vocab] logits

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def search_report(args, shape: Shape, memory: float, shown: int = 10) -> str:
    """The layout search on paper: the `shown` fastest predicted layouts that fit."""
    kind = GPUS[args.gpu][0]
    # On paper the prediction itself must fit (the search's slack is for its error against
    # a compiled step on the machine at hand).
    hw = search.Hardware(PEAK_BF16_FLOPS[kind], args.mfu, args.link_gbps * 1e9, args.link_latency_us * 1e-6,
                         memory / (1 + search.PRUNE_SLACK), tensor_link_bytes_per_s=args.nvlink_gbps * 1e9,
                         platform="gpu")
    model = PaperModel(shape.n_layers, shape.d_model, shape.n_heads, args.seq_len)
    batch = args.batch_size
    ranked, pruned = search.search(model, shape.n_params, args.gpus, hw, batch_size=batch, grad_accum=args.grad_accum,
                                   seq_len=args.seq_len, microbatches=(4, 16, 64), max_tensor=max(TENSOR_SIZES))
    lines = [f"layout search (sharding.search) for a batch of {batch} x {args.seq_len} tokens, "
             f"{args.grad_accum} micro-batch(es), link {args.link_gbps:g} GB/s (tensor axis {args.nvlink_gbps:g}) "
             f"+ {args.link_latency_us:g} us: "
             f"{len(ranked)} layouts fit, {len(pruned)} pruned by memory",
             "step = FLOPs/(n·peak·MFU)/(1-bubble) + Σ count·(latency + ring·bytes/bandwidth)",
             f"{'layout':<46} {'step s':>8} {'compute':>8} {'comm':>8} {'bubble':>6} {'GB/dev':>7}"]
    for p in ranked[:shown]:
        lines.append(f"{p.layout.name:<46} {p.step_s:8.2f} {p.compute_s:8.2f} {p.comm_s:8.2f} "
                     f"{p.bubble:6.1%} {p.memory_bytes / 1e9:7.1f}")
    if ranked:
        best = ranked[0]
        days = args.tokens / (batch * args.seq_len) * best.step_s / 86400
        lines.append(f"best on paper: {best.layout.name}: {best.step_s:.2f} s/step, "
                     f"{days:,.1f} days for {args.tokens:.3g} tokens")
    else:
        lines.append(f"no layout of our presets fits {args.gpus} x {args.gpu}; add GPUs")
    return "\n".join(lines)


def report(args) -> str:
    """The printed estimate (formulas, time, memory table, answer) for parsed arguments."""
    kind, mem = GPUS[args.gpu]
    memory = mem * args.headroom
    shape = infer_shape(args.params, args.layers, args.d_model)
    if args.heads:
        shape = dataclasses.replace(shape, n_heads=args.heads)
    dense, attn = train_flops(shape, args.tokens, args.seq_len)
    hours = (dense + attn) / (PEAK_BF16_FLOPS[kind] * args.mfu) / 3600
    gb = lambda b: f"{b / 1e9:8.1f}"  # noqa: E731
    n, psi = args.gpus, args.params
    lines = [
        f"model: Ψ={psi:.3g} params, L={shape.n_layers}, d={shape.d_model}, heads={shape.n_heads}, "
        f"T={args.seq_len}; D={args.tokens:.3g} tokens; {n} x {args.gpu} ({kind}, "
        f"{PEAK_BF16_FLOPS[kind] / 1e12:.0f} TFLOP/s bf16, {mem / 1e9:.0f} GB, {args.headroom:.0%} usable)",
        "",
        f"FLOPs = 6·Ψ·D + 12·L·d·T·D = {dense:.3e} + {attn:.3e} = {dense + attn:.3e}",
        f"GPU-hours = FLOPs / (peak · MFU) / 3600 = {hours:,.0f} at MFU {args.mfu:.0%}",
        f"days on {n} GPUs = {hours / n / 24:,.1f}",
        "",
        "ZeRO bytes per device for model states (Rajbhandari et al. 2020; mixed-precision "
        "Adam: bf16 params 2, bf16 grads 2, fp32 master + moments 12), N = data-parallel shards:",
    ]
    for stage in ZERO_STAGES:
        lines.append(f"  stage {stage}: {zero_formula(stage):<20} = "
                     f"{gb(psi * zero_bytes_per_param(stage, n))} GB at N={n}")
    m = args.pp_microbatches
    lines += ["", f"per device, GB ({'full remat' if args.remat == 'full' else 'no remat'}, "
              f"micro-batch {args.micro_batch}; * fits in {memory / 1e9:.0f} GB); pipeline bubble "
              f"(GPipe and 1F1B, m={m} microbatches) = (p-1)/(m+p-1):",
              f"{'tensor':>6} {'pipe':>4} {'data':>5} {'bubble':>6} {'activ.':>8} " +
              " ".join(f"{'zero' + str(s):>9}" for s in ZERO_STAGES)]
    rows = layouts(shape, n, args.seq_len, args.micro_batch, args.remat == "full")
    for i in range(0, len(rows), len(ZERO_STAGES)):
        group = rows[i:i + len(ZERO_STAGES)]
        r = group[0]
        cells = " ".join(f"{gb(g.total)}{'*' if g.total <= memory else ' '}" for g in group)
        lines.append(f"{r.tensor:>6} {r.pipeline:>4} {r.data:>5} {pipeline_bubble(r.pipeline, m):6.1%} "
                     f"{gb(r.activations)} {cells}")
    best = smallest_fitting(rows, memory)
    lines.append("")
    lines.append("smallest layout that fits: " + (
        f"ZeRO-{best.stage}, tensor={best.tensor}, pipeline={best.pipeline}, data={best.data}: "
        f"{best.total / 1e9:.1f} GB per device" if best else f"none on {n} GPUs; add GPUs"))
    return "\n".join(lines + ["", search_report(args, shape, memory)])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.estimate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(GPT3), help="a GPT-3 size (sets --params, --layers, --d-model, "
                        "--heads, --seq-len 2048, --tokens 300e9, --batch-size)")
    parser.add_argument("--params", type=float, help="parameter count, e.g. 100e9")
    parser.add_argument("--tokens", type=float, help="training tokens, e.g. 2e12")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--gpus", type=int, default=1024, help="GPU count (default 1024)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilization (default 0.4)")
    parser.add_argument("--seq-len", type=int, help="default 4096 (2048 for --model)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--layers", type=int, help="default: inferred from --params")
    parser.add_argument("--d-model", type=int, help="default: inferred from --params")
    parser.add_argument("--heads", type=int, help="default: d_model / 128")
    parser.add_argument("--batch-size", type=int, help="sequences per step for the layout search (default: "
                        "GPT-3's batch for --model, else 1M tokens)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    parser.add_argument("--link-gbps", type=float, default=50.0,
                        help="collective bandwidth per GPU, GB/s (default 50: one 400 Gb/s NIC per GPU)")
    parser.add_argument("--nvlink-gbps", type=float, default=450.0,
                        help="tensor-parallel bandwidth per GPU within a node, GB/s (default 450: H100 NVLink)")
    parser.add_argument("--link-latency-us", type=float, default=10.0, help="per collective (default 10)")
    parser.add_argument("--remat", choices=("full", "none"), default="full")
    parser.add_argument("--pp-microbatches", type=int, default=16,
                        help="pipeline microbatches per step, for the bubble column (default 16)")
    parser.add_argument("--headroom", type=float, default=0.9, help="usable fraction of GPU memory")
    args = parser.parse_args(argv)
    positive = ("params", "tokens", "gpus", "seq_len", "micro_batch", "layers", "d_model", "heads", "batch_size",
                "grad_accum", "link_gbps", "nvlink_gbps", "pp_microbatches")  # None: not given, a default follows
    bad = [name for name in positive
           if getattr(args, name) is not None and not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0)]
    bad += [name for name in ("mfu", "headroom") if not 0 < getattr(args, name) <= 1]
    if not (math.isfinite(args.link_latency_us) and args.link_latency_us >= 0):
        bad.append("link_latency_us")
    if bad:
        named = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in bad)
        parser.error(f"{named}: counts, sizes and bandwidths must be finite and > 0, --mfu and --headroom in (0, 1], "
                     "--link-latency-us finite and >= 0")
    if args.model:
        n_params, layers, d_model, heads, batch = GPT3[args.model]
        for key, value in (("params", n_params), ("layers", layers), ("d_model", d_model), ("heads", heads),
                           ("tokens", GPT3_TOKENS), ("seq_len", GPT3_CONTEXT)):
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.batch_size = args.batch_size or batch
    if args.params is None or args.tokens is None:
        parser.error("give --model, or --params and --tokens")
    args.seq_len = args.seq_len or 4096
    args.batch_size = args.batch_size or max(1, round(1e6 / args.seq_len))
    if args.batch_size % args.grad_accum:
        parser.error(f"--grad-accum {args.grad_accum} must divide --batch-size {args.batch_size}")
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
