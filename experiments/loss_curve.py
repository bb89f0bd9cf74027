"""Same math as PyTorch? `python -m experiments.loss_curve --config FILE --torch-peer PATH`.

Trains our GPT-2 (the config's model, optimizer and schedule, through the real train step) and
the torch peer's nanoGPT-style GPT-2 (the `GPT` class of ../shared/peers/torch_peer_gpt2.py,
loaded from PATH: same architecture and init scheme) on the same batches of the bundled corpus,
with the same AdamW settings, weight-decay mask, learning-rate schedule and gradient clipping,
bf16 compute over fp32 weights on both sides. The two loss curves should agree within the noise
of different random initial weights: this checks that our speed is not bought with wrong math.

Reports the per-step losses, the mean |difference| of the 20-step running means after warm-up,
and the final running means; writes benchmarks/results/loss_curve-<config>_<device>_<date>.json/.png.
Needs a GPU and torch (the GPU machine has both).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, load_config
from llmjax.data import BatchIterator, load_dataset
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import lr_schedule, make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from pallas_kernels import _bench

RESULTS = pathlib.Path("benchmarks/results")
WINDOW = 20


def running_mean(values, window=WINDOW) -> np.ndarray:
    v = np.asarray(values, np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    return (c[window:] - c[:-window]) / window


def ours(cfg, batches) -> list[float]:
    graphdef, params = split_model(init_model(cfg.model, seed=cfg.train.seed))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    step = make_train_step(graphdef, optimizer)
    state = init_train_state(params, optimizer)
    losses = []
    for b in batches:
        state, metrics = step(state, jnp.asarray(b[None]))
        losses.append(metrics["loss"])
    return [float(x) for x in jax.device_get(losses)]


def torch_peer(cfg, batches, peer_path: str) -> list[float]:
    import torch

    spec = importlib.util.spec_from_file_location("torch_peer", peer_path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    mc, oc = cfg.model, cfg.optim
    torch.manual_seed(cfg.train.seed)
    model = peer.GPT(mc.vocab_size, mc.n_layers, mc.d_model, mc.n_heads, mc.max_seq_len).cuda()
    # Our decay mask: matmul weights decay; embeddings, norms and biases do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=True)
    schedule = lr_schedule(oc, cfg.train.steps)
    compiled = torch.compile(model)
    losses = []
    for i, b in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = float(schedule(i))
        t = torch.from_numpy(np.asarray(b, np.int64)).cuda()
        with torch.autocast("cuda", torch.bfloat16):
            loss = compiled(t[:, :-1].contiguous(), t[:, 1:].contiguous())  # the peer .view()s its targets
        loss.backward()
        if oc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return [float(x) for x in losses]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.loss_curve", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--torch-peer", required=True, help="path of torch_peer_gpt2.py (its GPT class is used)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.steps <= 2 * WINDOW:
        p.error(f"--steps must exceed {2 * WINDOW} (two {WINDOW}-step running-mean windows); got {args.steps}")
    if not pathlib.Path(args.torch_peer).is_file():  # checked now, not after our whole run
        p.error(f"--torch-peer {args.torch_peer}: no such file")
    try:
        cfg = load_config(args.config, [*args.overrides, f"train.steps={args.steps}"])
    except ConfigError as e:
        p.error(str(e))
    if cfg.model.family != "gpt2":
        p.error(f"the torch peer is a GPT-2; model.family={cfg.model.family!r} is not comparable")
    data = load_dataset(cfg.data.corpus, cfg.data.tokenizer, cfg.data.seq_len, cfg.data.val_fraction)
    it = BatchIterator(data.train, cfg.train.batch_size, seed=cfg.train.seed)
    batches = [np.asarray(next(it)) for _ in range(args.steps)]

    curves = {"llmjax": ours(cfg, batches), "torch": torch_peer(cfg, batches, args.torch_peer)}
    smooth = {k: running_mean(v) for k, v in curves.items()}
    skip = min(cfg.optim.warmup_steps, args.steps // 2)  # compare after warm-up
    gap = np.abs(smooth["llmjax"][skip:] - smooth["torch"][skip:])
    summary = dict(mean_abs_gap=float(gap.mean()), max_abs_gap=float(gap.max()),
                   final={k: float(v[-1]) for k, v in smooth.items()})
    print(f"{WINDOW}-step running means after step {skip}: mean |gap| {summary['mean_abs_gap']:.4f}, "
          f"max {summary['max_abs_gap']:.4f}; final llmjax {summary['final']['llmjax']:.4f}, "
          f"torch {summary['final']['torch']:.4f}")

    device = jax.devices()[0].device_kind
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / _bench.results_stem(f"loss_curve-{pathlib.Path(args.config).stem}", device, date)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(config=pathlib.Path(args.config).stem, overrides=args.overrides, device=device, jax=jax.__version__,
             date=date, steps=args.steps, window=WINDOW, curves=curves, **summary), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, v in curves.items():
        ax.plot(v, alpha=0.3, lw=0.8)
        ax.plot(np.arange(WINDOW - 1, len(v)), smooth[name], label=f"{name} ({WINDOW}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(f"{stem.name}: same batches, same optimizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
