"""Scaling laws (Kaplan et al. 2020, eq. 1.1 and figure 1): test loss falls as a power law in
non-embedding parameters, L(N) = (N_c / N)^alpha_N with alpha_N = 0.076 (models trained near
convergence on WebText2).

A tiny sweep: 3 (CPU) or 4 (GPU) model widths, each trained on the same fixed token budget of the bundled
corpus (same lr schedule, batches and seed), then val loss against non-embedding parameters
and a fitted power law (a straight line in log-log). A fixed, short budget is not Kaplan's
converged regime, so the exponent differs; the sign and the straight line are the claim.
"""
import jax.numpy as jnp
import numpy as np

from experiments.reproduce.common import compare, loglog_slope
from llmjax.config import OptimConfig, load_config
from llmjax.data.dataset import BatchIterator, load_dataset
from llmjax.models import count_params, init_model, split_model
from llmjax.train.optimizer import lr_schedule, make_optimizer
from llmjax.train.step import init_train_state, make_eval_step, make_train_step

SOURCE = "Kaplan et al. 2020, eq. 1.1"
KAPLAN_ALPHA_N = 0.076


def non_embedding_params(cfg, n_params: int) -> int:
    """Kaplan's N: all params but the token and position embeddings (and an untied head)."""
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return n_params - embed - (cfg.max_seq_len * cfg.d_model if cfg.family == "gpt2" else 0)


def train_one(overrides: list[str], data, *, steps: int, batch_size: int, lr: float) -> dict:
    """Train one model on `steps` batches; its size and final val loss."""
    cfg = load_config(overrides=overrides).model
    graphdef, params = split_model(init_model(cfg))
    optim = OptimConfig(lr=lr, warmup_steps=steps // 10)
    optimizer = make_optimizer(optim, steps)
    step = make_train_step(graphdef, optimizer, lr_schedule(optim, steps))
    state = init_train_state(params, optimizer)
    batches = BatchIterator(data.train, batch_size, seed=0)
    for _ in range(steps):
        state, metrics = step(state, jnp.asarray(next(batches))[None])
    evaluate = make_eval_step(graphdef)
    val = data.val[:batch_size * 4]
    val_loss = float(np.mean([evaluate(state["params"], jnp.asarray(val[i:i + batch_size]))
                              for i in range(0, len(val), batch_size)]))
    n = count_params(params)
    return dict(d_model=cfg.d_model, n_layers=cfg.n_layers, params=n, non_embedding=non_embedding_params(cfg, n),
                train_loss=float(metrics["loss"]), val_loss=val_loss)


def run(small: bool) -> dict:
    if small:
        seq_len, batch_size, steps, lr, tokenizer = 64, 16, 60, 3e-3, "bytes"
        base = ["preset=gpt2-tiny", "model.vocab_size=256", "model.n_layers=2", "model.n_heads=4",
                "model.n_kv_heads=4", f"model.max_seq_len={seq_len}"]
        widths = (16, 48, 128)
    else:
        # 500 steps of 64 x 256 tokens: ~6 passes over the 1.4M-token corpus (more passes risk overfitting
        # the widest models); non-embedding params 0.8M..9.6M (12x). Head dims 16..56 are multiples of 8,
        # which cuDNN's flash attention needs (others fall back to XLA attention).
        seq_len, batch_size, steps, lr, tokenizer = 256, 64, 500, 1e-3, "bundled"
        base = ["preset=gpt2-tiny", "model.vocab_size=8192", "model.n_layers=4", "model.n_heads=8",
                "model.n_kv_heads=8", f"model.max_seq_len={seq_len}", "model.dtype=bfloat16"]
        widths = (128, 192, 320, 448)
    data = load_dataset("shakespeare", tokenizer, seq_len, 0.05)
    rows = [train_one(base + [f"model.d_model={d}", f"model.d_mlp={4 * d}"], data, steps=steps,
                      batch_size=batch_size, lr=lr) for d in widths]
    slope = loglog_slope([r["non_embedding"] for r in rows], [r["val_loss"] for r in rows])
    prefactor = float(np.exp(np.polyfit(np.log([r["non_embedding"] for r in rows]),
                                        np.log([r["val_loss"] for r in rows]), 1)[1]))
    budget = (f"{steps * batch_size * seq_len:,} tokens per model, far from the convergence Kaplan's eq. 1.1 "
              "assumes")
    comparisons = [compare("alpha_N (L ~ N^-alpha_N)", KAPLAN_ALPHA_N, -slope, source=SOURCE,
                           why_low=f"{budget}: the loss here falls by how fast a width learns in a fixed "
                           "budget, not by its converged capacity, and the widest models can overfit a "
                           "small corpus",
                           why_high=f"{budget}: in a fixed budget wider models learn faster per token, "
                           "which steepens the slope beyond the converged one")]
    return dict(tokens_per_model=steps * batch_size * seq_len, tokenizer=tokenizer, rows=rows,
                fit=dict(alpha_n=-slope, prefactor=prefactor), comparisons=comparisons)


def format_result(result: dict) -> str:
    lines = [f"{result['tokens_per_model']:,} tokens per model ({result['tokenizer']} tokenizer)",
             f"{'d_model':>7} {'params':>10} {'non-embed':>10} {'train':>7} {'val':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['d_model']:7d} {r['params']:10,} {r['non_embedding']:10,} {r['train_loss']:7.3f} "
                     f"{r['val_loss']:7.3f}")
    fit = result["fit"]
    lines.append(f"fit: val loss = {fit['prefactor']:.3f} * N^-{fit['alpha_n']:.4f}")
    return "\n".join(lines)


def plot(result: dict, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    n = np.array([r["non_embedding"] for r in result["rows"]], float)
    ax.loglog(n, [r["val_loss"] for r in result["rows"]], "o", label="val loss")
    grid = np.geomspace(n.min(), n.max(), 50)
    fit = result["fit"]
    ax.loglog(grid, fit["prefactor"] * grid ** -fit["alpha_n"], "--",
              label=f"fit: N^-{fit['alpha_n']:.3f} (Kaplan: N^-{KAPLAN_ALPHA_N})")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("val loss (nats/token)")
    ax.legend()
    return fig
