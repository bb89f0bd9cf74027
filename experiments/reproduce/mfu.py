"""Model FLOPs utilization (PaLM, Chowdhery et al. 2022, appendix B and table 3): training
costs 6N + 12·L·d·T FLOPs per token, and a well-run large job reaches 46.2% MFU (PaLM 540B on
TPU v4).

We train a real model on the bundled corpus (the jitted train step, batches from the data
iterator), time the steps, and report MFU with the per-component FLOP breakdown. The formula's
total is set against XLA's own count of the lowered step (`cost_analysis()`; it counts the body
of the layer scan once, so we count 1- and 2-layer twins and extrapolate to L layers). On a CPU the peak is a measured fp32 matmul ceiling on this
machine, not a datasheet number; on a GPU the bf16 datasheet peak (`llmjax.train.flops`).
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.reproduce.common import compare, on_gpu
from llmjax.config import OptimConfig, load_config
from llmjax.data.dataset import BatchIterator, load_dataset
from llmjax.models import count_params, init_model, split_model
from llmjax.train.flops import device_peak_flops, flops_per_token, matmul_params
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from pallas_kernels._bench import median_seconds

SOURCE = "Chowdhery et al. 2022 (PaLM), app. B, table 3"
PALM_MFU = 0.462


def flop_breakdown(cfg, n_params: int, seq_len: int) -> dict:
    """Training FLOPs per token by component (6 per matmul weight: forward 2, backward 4)."""
    d, f, layers = cfg.d_model, cfg.d_mlp, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    parts = {"attention projections": 6 * layers * (2 * d * d + 2 * d * kv),
             "mlp": 6 * layers * (3 if cfg.family == "llama" else 2) * d * f,
             "lm head": 6 * cfg.vocab_size * d,
             "attention scores (12·L·d·T)": 12 * layers * d * seq_len}
    parts["other weights (biases, norms)"] = 6 * matmul_params(cfg, n_params) - sum(
        v for k, v in parts.items() if not k.startswith("attention scores"))
    return parts


def xla_flops_per_step(model_cfg, optimizer, tokens_shape) -> float:
    """XLA's FLOP count of the train step. XLA counts the body of the layer scan once, so the
    count of the whole step gets L - 1 more copies of one block's forward + backward."""
    graphdef, params = split_model(nnx.eval_shape(lambda: init_model(model_cfg)))
    state = jax.eval_shape(lambda: init_train_state(params, optimizer))
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    step_count = make_train_step(graphdef, optimizer).lower(state, tokens).cost_analysis()["flops"]
    blocks = nnx.merge(graphdef, params).blocks
    block_def, stacked = nnx.split(blocks)
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), stacked)
    b, t = tokens_shape[1], tokens_shape[2] - 1
    x = jax.ShapeDtypeStruct((b, t, model_cfg.d_model), jnp.dtype(model_cfg.dtype))

    def block_out(layer_state, x):
        y = nnx.merge(block_def, layer_state)(x, jnp.arange(t)[None], None)[0]
        return jnp.sum(y.astype(jnp.float32))

    body = jax.jit(jax.grad(block_out, argnums=(0, 1))).lower(one_layer, x).cost_analysis()["flops"]
    return step_count + (model_cfg.n_layers - 1) * body


def matmul_ceiling(size: int = 2048, dtype=jnp.float32) -> float:
    """FLOP/s of one large jitted matmul on the first device: what this machine can reach."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    seconds = median_seconds(jax.jit(jnp.matmul), [(a, a)], reps=5)
    return 2 * size ** 3 / seconds


def run(small: bool) -> dict:
    overrides = (["preset=gpt2-tiny", "model.d_model=128", "model.n_layers=2", "model.d_mlp=512",
                  "data.seq_len=128", "data.tokenizer=bytes"] if small else
                 ["preset=gpt2-small", "data.seq_len=1024"])
    cfg = load_config(overrides=overrides)
    batch_size, steps = (8, 5) if small else (16, 30)
    seq_len = cfg.data.seq_len
    data = load_dataset(cfg.data.corpus, cfg.data.tokenizer, seq_len, cfg.data.val_fraction)
    graphdef, params = split_model(init_model(cfg.model))
    n_params = count_params(params)
    optimizer = make_optimizer(OptimConfig(), total_steps=steps)
    state = init_train_state(params, optimizer)
    batches = BatchIterator(data.train, batch_size)
    step = make_train_step(graphdef, optimizer)
    first = jnp.asarray(next(batches))[None]
    compiled = step.lower(state, first).compile()
    xla_flops = xla_flops_per_step(cfg.model, optimizer, first.shape)
    times, losses = [], []
    for _ in range(steps + 1):  # the first is a warm-up
        tokens = jnp.asarray(next(batches))[None]
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[1:])
    tokens_per_step = batch_size * seq_len
    per_token = flops_per_token(cfg.model, n_params, seq_len)
    peak = device_peak_flops() if on_gpu() else matmul_ceiling()
    mfu = per_token * tokens_per_step / step_s / peak
    comparisons = [
        compare("6N + 12·L·d·T vs XLA's FLOP count of the step", xla_flops / tokens_per_step, per_token,
                source=SOURCE, why="XLA also counts elementwise work (softmax, norms, GELU, AdamW); the "
                "formula counts matmuls only"),
        compare("MFU", PALM_MFU, mfu, source=SOURCE,
                why="a tiny model on a CPU against a matmul ceiling measured in the same run: not the "
                "regime of the paper, and both numbers move with the machine's load" if small else
                "a 124M model (short matmuls, big LM head share) on one GPU vs 540B on 6144 TPU v4 chips"),
    ]
    return dict(model=overrides, params=n_params, batch_size=batch_size, seq_len=seq_len, step_s=step_s,
                tokens_per_s=tokens_per_step / step_s, flops_per_token=per_token,
                xla_flops_per_token=xla_flops / tokens_per_step, peak_flops=peak,
                peak_source="datasheet bf16" if on_gpu() else "measured fp32 matmul", mfu=mfu,
                breakdown=flop_breakdown(cfg.model, n_params, seq_len), losses=losses, comparisons=comparisons)


def format_result(result: dict) -> str:
    total = sum(result["breakdown"].values())
    lines = [f"{result['params']:,} params, {result['batch_size']} x {result['seq_len']} tokens/step: "
             f"{result['step_s'] * 1e3:.1f} ms/step, {result['tokens_per_s']:,.0f} tok/s, loss "
             f"{result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}",
             f"peak {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_source']}), MFU {result['mfu']:.1%}",
             "FLOPs per token by component:"]
    for name, flops in result["breakdown"].items():
        lines.append(f"  {name:<30} {flops:14,.0f}  {flops / total:6.1%}")
    lines.append(f"  {'total':<30} {total:14,.0f}  (flops_per_token: {result['flops_per_token']:,.0f})")
    return "\n".join(lines)


def plot(result: dict, plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names, values = zip(*result["breakdown"].items())
    axes[0].barh(np.arange(len(names)), np.array(values) / 1e6)
    axes[0].set_yticks(np.arange(len(names)), names, fontsize=8)
    axes[0].set_xlabel("MFLOPs per token (training)")
    axes[1].bar(["ours", "PaLM 540B"], [result["mfu"] * 100, PALM_MFU * 100])
    axes[1].set_ylabel(f"MFU % (peak: {result['peak_source']})")
    return fig
