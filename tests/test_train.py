"""Train step: it learns, gradient accumulation is exact, the decay mask is right."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax.config import OptimConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.flops import flops_per_token
from llmjax.train.optimizer import decay_mask, make_optimizer
from llmjax.train.step import init_train_state, make_train_step


def setup(preset="llama-tiny", lr=3e-3):
    graphdef, params = split_model(init_model(load_config(overrides=[f"preset={preset}"]).model))
    optimizer = make_optimizer(OptimConfig(lr=lr, warmup_steps=0, grad_clip=1.0), total_steps=100)
    return graphdef, params, optimizer


def test_overfits_a_fixed_batch():
    graphdef, params, optimizer = setup()
    step = make_train_step(graphdef, optimizer)
    state = init_train_state(params, optimizer)
    batch = jax.random.randint(jax.random.key(0), (1, 4, 33), 0, 512, dtype=jnp.int32)
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] > 5.5  # ~ln(512) at init
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert int(state["step"]) == 60


def test_grad_accumulation_equals_one_big_batch():
    graphdef, params, _ = setup()
    # SGD with lr 1: the param change is the gradient itself (Adam's first step is ~sign(g),
    # which turns rounding noise in near-zero gradients into lr-sized differences).
    optimizer = optax.sgd(1.0)
    step = make_train_step(graphdef, optimizer)
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, 512, dtype=jnp.int32)
    copy = lambda: init_train_state(jax.tree.map(jnp.array, params), optimizer)
    one, m_one = step(copy(), batch.reshape(1, 8, 17))
    four, m_four = step(copy(), batch.reshape(4, 2, 17))
    np.testing.assert_allclose(m_one["loss"], m_four["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_one["grad_norm"], m_four["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 one["params"], four["params"])


def test_weight_decay_mask_skips_norms_biases_embeddings():
    _, params, _ = setup("gpt2-tiny")
    mask = decay_mask(params)
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_out"]
    assert not mask["embed"] and not mask["pos_embed"]
    assert not mask["blocks"]["attn"]["bq"] and not mask["blocks"]["attn_norm"]["scale"]
    assert not mask["final_norm"]["bias"]


def test_flops_per_token_gpt2_small():
    cfg = load_config(overrides=["preset=gpt2-small"]).model
    n = 124_439_808
    # nanoGPT's count: N excludes position embeddings, attention adds 12·L·d·T.
    assert flops_per_token(cfg, n, 1024) == 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024


def test_flops_per_token_counts_frozen_weights_at_four():
    """LoRA: the frozen base's matmul weights cost 4 FLOPs a token (no weight gradient), the
    adapters 6."""
    cfg = load_config(overrides=["preset=gpt2-small"]).model
    base, adapters = 124_439_808, 1_000_000
    matmuls = base - 1024 * 768
    assert flops_per_token(cfg, base + adapters, 1024, n_frozen=matmuls) == \
        4 * matmuls + 6 * adapters + 12 * 12 * 768 * 1024
