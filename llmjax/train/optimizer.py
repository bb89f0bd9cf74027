"""AdamW with warmup + cosine decay, a weight-decay mask and global-norm clipping (optax)."""
import jax
import optax

from llmjax.config import OptimConfig

# Weight matrices are decayed; norms, biases and embeddings are not (GPT-2/nanoGPT practice).
DECAYED = frozenset({"wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out", "lm_head"})


def decay_mask(params):
    """True for the leaves named in DECAYED, and for the LoRA adapters of such a weight
    (`.../wq/a`): params is a nested dict, leaf names last."""
    return jax.tree_util.tree_map_with_path(lambda path, _: any(k.key in DECAYED for k in path), params)


def lr_schedule(cfg: OptimConfig, total_steps: int):
    """Linear warmup to cfg.lr, then cosine to cfg.lr * cfg.min_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer a train step applies; its state holds the step count for the schedule."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
