"""model.scan_layers=False (a Python loop over the stacked layers) computes what the scan does."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import load_config
from llmjax.models import init_model, split_model
from llmjax.train.step import loss_fn


@pytest.mark.parametrize("preset,remat", [("gpt2-tiny", "none"), ("llama-tiny", "dots")])
def test_unrolled_layers_equal_the_scan(preset, remat):
    cfg = load_config(overrides=[f"preset={preset}", f"model.remat={remat}"]).model
    graphdef, params = split_model(init_model(cfg, seed=0))
    unrolled_def, _ = split_model(init_model(dataclasses.replace(cfg, scan_layers=False), seed=0))
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, cfg.vocab_size)
    loss_scan, grads_scan = jax.value_and_grad(loss_fn)(params, graphdef, tokens)
    loss_loop, grads_loop = jax.value_and_grad(loss_fn)(params, unrolled_def, tokens)
    np.testing.assert_allclose(loss_loop, loss_scan, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_loop, grads_scan)


def test_unrolled_model_still_decodes_with_the_scan():
    cfg = load_config(overrides=["preset=gpt2-tiny", "model.scan_layers=false"]).model
    model = init_model(cfg, seed=0)
    from llmjax.models import init_cache

    tokens = jnp.arange(5, dtype=jnp.int32)[None]
    full, _ = model(tokens)
    cached, cache = model(tokens, cache=init_cache(cfg, 1, 8))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    assert cache["k"].shape[0] == cfg.n_layers
