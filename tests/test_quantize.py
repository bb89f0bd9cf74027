"""int8 weight-only quantization: per-channel rounding bound, which weights are quantized,
the quantized model's logits, perplexity, and bytes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.config import DecodeConfig, load_config
from llmjax.data import load_dataset
from llmjax.decode import generate, prepare_decode
from llmjax.decode.quantize import perplexity, quantize
from llmjax.ops import Int8Weight
from llmjax.models import init_model


def tiny(preset, *overrides):
    return init_model(load_config(overrides=[f"preset={preset}", *overrides]).model, seed=1)


def test_quantize_rounds_within_half_a_step_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (3, 48, 4, 16)) * jnp.linspace(0.1, 3, 16)  # [L, D, N, H]
    q = quantize(w, (1,), jnp.float32)
    assert q.values.dtype == jnp.int8 and q.scale.shape == (3, 1, 4, 16)
    np.testing.assert_allclose(q.scale[:, 0], jnp.abs(w).max(1) / 127, rtol=1e-6)
    assert np.all(np.abs(q[...] - w) <= q.scale / 2 * (1 + 1e-5))
    assert np.abs(q.values).max() == 127
    with pytest.raises(IndexError, match="got index 0"):
        q[0]


@pytest.mark.parametrize("preset, quantized_embed", [("gpt2-tiny", True), ("llama-tiny", False)])
def test_int8_model(preset, quantized_embed):
    model = tiny(preset)
    int8 = prepare_decode(model, int8=True)
    leaves = jax.tree_util.tree_leaves_with_path(int8.params, is_leaf=lambda x: isinstance(x, Int8Weight))
    is_int8 = {"/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey)): isinstance(v, Int8Weight)
               for path, v in leaves}
    names = ["blocks/attn/wq", "blocks/attn/wo", "blocks/mlp/w_in", "blocks/mlp/w_out"]
    assert all(is_int8[n] for n in names + ([] if quantized_embed else ["lm_head"]))
    assert is_int8["embed"] == quantized_embed
    assert not is_int8["blocks/attn_norm/scale"]
    # Bytes: quantized weights take 1 byte per parameter (+ scales) instead of 4 (fp32 here).
    assert int8.weight_bytes < 0.45 * prepare_decode(model).weight_bytes
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 512, dtype=jnp.int32)
    exact = model(tokens)[0]

    quantized = nnx.merge(int8.graphdef, int8.params)(tokens)[0]
    assert float(jnp.linalg.norm(quantized - exact) / jnp.linalg.norm(exact)) < 1e-2
    out = generate(int8, tokens[:1, :4], DecodeConfig(max_new_tokens=4, temperature=0.0))
    assert out.shape == (1, 8)


def test_perplexity_int8_beside_float_on_the_bundled_corpus():
    data = load_dataset("shakespeare", "bundled", seq_len=32, val_fraction=0.05)
    model = tiny("gpt2-tiny", "model.vocab_size=8192", "model.init_std=0.2")
    windows = data.val[:8]
    full = perplexity(model, windows, batch_size=4)
    # The definition: exp of the mean cross-entropy over every target token.
    logits = model(jnp.asarray(windows[:, :-1]))[0]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(windows[:, 1:, None]), -1)
    assert full == pytest.approx(float(jnp.exp(nll.mean())), rel=1e-4)
    int8 = perplexity(prepare_decode(model, int8=True), windows, batch_size=4)
    assert int8 != full and int8 == pytest.approx(full, rel=2e-2)
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(model, windows[:0])


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])  # tied (int8 embedding) / untied head
def test_int8_matmuls_equal_the_dequantized_weights(preset):
    """Scaling after the matmul, (x @ q) * s, is x @ (q * s): the int8 model against the same
    model given the dequantized weights, with fused projections (no cache) and apart (cache)."""
    from llmjax.models import init_cache

    int8 = prepare_decode(tiny(preset), int8=True)
    is_int8 = lambda x: isinstance(x, Int8Weight)  # noqa: E731
    dequantized = jax.tree.map(lambda w: w[...] if is_int8(w) else w, int8.params, is_leaf=is_int8)
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 512, dtype=jnp.int32)
    # highest: a GPU's default fp32 matmul is TF32, which rounds q * s but not the int8 q.
    with jax.default_matmul_precision("highest"):
        for cache in (None, init_cache(int8.cfg, 2, 16)):
            got = nnx.merge(int8.graphdef, int8.params)(tokens, cache=cache)[0]
            want = nnx.merge(int8.graphdef, dequantized)(tokens, cache=cache)[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
