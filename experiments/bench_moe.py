"""MoE block vs the dense MLP of equal active parameters: `python -m experiments.bench_moe
[--cases a,b] [--family llama] [--reps 20]`.

For each case (tokens, d_model, experts, top_k, expert width F) it times, in one run, forward and
forward+backward of: the dense feed-forward of width top_k * F (`xla`, the peer), the MoE block
with `moe_impl=ragged` (router, grouping, grouped matmuls, combine) through the Pallas grouped
matmul (`ragged`: Triton kernels, pallas_kernels/grouped_matmul, interpret mode off a GPU;
`ragged_mosaic`: Mosaic GPU forward/dX kernel, Hopper) and through `jax.lax.ragged_dot`
(`ragged_xla`), and with `moe_impl=dense` (every expert on every token). `ragged_xla` and
`dense` both do E times the work (XLA expands ragged_dot to a dense dot over all experts) and
are skipped past EXPANDED_MAX_EXPERTS experts.
Each row prints (flushed) as it finishes. TFLOP/s counts the dense-equivalent matmul FLOPs
for every row (2 * tokens * n_mats * d_model * top_k * F forward, 3x that forward+backward;
n_mats 3 for SwiGLU, 2 for GELU), so a row's ratio to the peer is its speed relative to the dense
MLP. bf16 compute and params. Writes benchmarks/results/moe_<device>_<date>.json and .png.
"""
import argparse
import dataclasses
import datetime
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import jaxlib
from flax import nnx

from experiments.bench_kernels import RESULTS, add_peer_ratios, plot, table
from llmjax.config import ModelConfig
from llmjax.models.moe import MoE
from llmjax.models.transformer import FeedForward
from pallas_kernels import _bench


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    d_model: int
    n_experts: int
    top_k: int
    d_expert: int


CASES = [
    Case("tiny", 2, 64, 64, 8, 2, 32),  # for a CPU check
    Case("d1024-e8-k2", 8, 2048, 1024, 8, 2, 2048),
    Case("d2048-e8-k2", 8, 2048, 2048, 8, 2, 4096),  # Mixtral-like routing at 1/2 width
    Case("d2048-e64-k8", 8, 2048, 2048, 64, 8, 512),  # fine-grained experts
]
# impl -> (model.moe_impl, MoE grouped_matmul); "xla" is the dense MLP of width top_k * d_expert.
IMPLS = {"xla": (None, None), "ragged": ("ragged", "triton"), "ragged_mosaic": ("ragged", "mosaic"),
         "ragged_xla": ("ragged", "xla"), "dense": ("dense", "auto")}
# Impls whose work and memory grow with E: skipped past 16 experts (at d2048-e64-k8 XLA's
# autotuner ran out of H100 memory on a [64, 131072, 2048] bf16 operand).
EXPANDED_IMPLS = ("dense", "ragged_xla")
EXPANDED_MAX_EXPERTS = 16


def model_config(case: Case, family: str, impl: str) -> ModelConfig:
    """The config of one row: impl "xla" is the dense MLP of width top_k * d_expert."""
    moe_impl = IMPLS[impl][0]
    return ModelConfig(family=family, n_layers=1, n_heads=1, n_kv_heads=1, d_model=case.d_model,
                       d_mlp=case.d_expert if moe_impl else case.top_k * case.d_expert, dtype="bfloat16",
                       param_dtype="bfloat16", n_experts=case.n_experts if moe_impl else 0,
                       moe_top_k=case.top_k, moe_impl=moe_impl or "ragged")


def dense_equivalent_flops(case: Case, family: str) -> float:
    """Forward matmul FLOPs of the dense MLP of width top_k * d_expert on all tokens."""
    n_mats = 3 if family == "llama" else 2
    return 2.0 * case.batch * case.seq * n_mats * case.d_model * case.top_k * case.d_expert


def _functions(cfg: ModelConfig, grouped_matmul: str):
    """(forward, forward+backward) jitted functions of (params, x, cotangent)."""
    with nnx.use_eager_sharding(False):
        module = (MoE(cfg, nnx.Rngs(params=0), grouped_matmul=grouped_matmul) if cfg.n_experts
                  else FeedForward(cfg, nnx.Rngs(params=0)))
    graphdef, params = nnx.split(module)

    def apply(params, x):
        out = nnx.merge(graphdef, params)(x)
        return out[0] if cfg.n_experts else out

    forward = jax.jit(lambda p, x, ct: apply(p, x))
    forward_backward = jax.jit(lambda p, x, ct: jax.vjp(apply, p, x)[1](ct))
    return params, forward, forward_backward


def rows(cases, family: str, reps: int, impls=tuple(IMPLS), log=print) -> list[dict]:
    """One row per (case, impl, mode) with time_ms and tflops (or error), each logged as it
    finishes (so a run cut short keeps what it printed)."""
    out = []
    for case in cases:
        flops = dense_equivalent_flops(case, family)
        shape = (case.batch, case.seq, case.d_model)
        arg_key, ct_key = jax.random.split(jax.random.key(0))
        x = jax.random.normal(arg_key, shape, jnp.bfloat16)
        cotangent = jax.random.normal(ct_key, shape, jnp.bfloat16)
        for impl in impls:
            if impl in EXPANDED_IMPLS and case.n_experts > EXPANDED_MAX_EXPERTS:
                continue
            for mode, scale in (("fwd", 1), ("fwd_bwd", 3)):
                row = dict(case=case.name, impl=impl, mode=mode, peer=impl == "xla", family=family,
                           **dataclasses.asdict(case), **_bench.environment())
                try:
                    params, forward, forward_backward = _functions(model_config(case, family, impl),
                                                                   IMPLS[impl][1])
                    fn = forward if mode == "fwd" else forward_backward
                    seconds = _bench.median_seconds(fn, [(params, x, cotangent)], reps)
                    row.update(_bench.throughput(seconds, flops=scale * flops))
                except Exception as e:  # one failing row keeps the others
                    row["error"] = _bench.error_text(e)
                out.append(row)
                if log:
                    shown = row.get("error") or f"{row['tflops']:.4g} TFLOP/s ({row['time_ms']:.3f} ms)"
                    log(f"{case.name:>14} {mode:>7} {impl:>10}: {shown}", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_moe", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(c.name for c in CASES[1:]),
                        help=f"comma-separated, from {[c.name for c in CASES]}")
    parser.add_argument("--family", default="llama", choices=("llama", "gpt2"))
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {list(IMPLS)}")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; use some of {[c.name for c in CASES]}")
    impls = args.impls.split(",")
    if set(impls) - set(IMPLS):
        parser.error(f"unknown impl(s) {sorted(set(impls) - set(IMPLS))}; use some of {list(IMPLS)}")
    result_rows = rows(_bench.select(CASES, names), args.family, args.reps, impls)
    add_peer_ratios(result_rows, "tflops")
    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    stem = f"moe-{args.family}_{re.sub(r'[^a-z0-9]+', '_', device.lower()).strip('_')}_{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(op="moe", family=args.family, device=device, jax=jax.__version__, jaxlib=jaxlib.__version__,
                  date=date, timer=_bench.timer_name(), metric="TFLOP/s (dense-equivalent)", rows=result_rows)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result_rows, "tflops", args.out / f"{stem}.png",
         f"MoE block vs dense MLP of equal active params ({args.family}), {device}, jax {jax.__version__}, {date}")
    print(table(result_rows, "tflops"))
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
