"""Model shapes, parameter counts, causality and remat equivalence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.config import load_config
from llmjax.models import count_params, init_model, split_model


def model_cfg(preset, *overrides):
    return load_config(overrides=[f"preset={preset}", *overrides]).model


def tokens(shape, seed=0, vocab=512):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("preset, expected", [
    ("gpt2-small", 124_439_808),  # GPT-2 124M (HF GPT2LMHeadModel count, tied head)
    ("gpt2-medium", 354_823_168),  # GPT-2 350M
])
def test_gpt2_parameter_counts_match_published(preset, expected):
    abstract = nnx.eval_shape(lambda: init_model(model_cfg(preset)))  # shapes only
    assert count_params(abstract) == expected


@pytest.mark.parametrize("preset, published", [
    ("llama-1b", 1_100_048_384),  # TinyLlama-1.1B, untied head
    ("llama3.2-1b", 1_235_814_400),  # Llama-3.2-1B, tied head
])
def test_llama_1b_parameter_counts(preset, published):
    cfg = model_cfg(preset)
    per_layer = 2 * cfg.d_model + cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) \
        + 3 * cfg.d_model * cfg.d_mlp
    expected = cfg.n_layers * per_layer + (1 if cfg.tie_embeddings else 2) * cfg.vocab_size * cfg.d_model + cfg.d_model
    abstract = nnx.eval_shape(lambda: init_model(cfg))
    assert count_params(abstract) == expected == published


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_logits_shape_and_partition_names(preset):
    cfg = model_cfg(preset)
    model = init_model(cfg)
    logits, cache = model(tokens((2, 9)))
    assert logits.shape == (2, 9, cfg.vocab_size) and logits.dtype == jnp.float32 and cache is None
    specs = nnx.get_partition_spec(nnx.state(model))
    assert tuple(specs["blocks"]["attn"]["wk"].get_value()) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")
    assert tuple(specs["blocks"]["mlp"]["w_in"].get_value()) == ("layers", "embed", "mlp")


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_future_tokens_do_not_change_past_logits(preset):
    model = init_model(model_cfg(preset))
    a = tokens((2, 16), seed=1)
    b = a.at[:, 10:].set(tokens((2, 6), seed=2))
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_array_equal(la[:, :10], lb[:, :10])
    assert not np.allclose(la[:, 10:], lb[:, 10:])


def test_sequence_longer_than_max_len_is_rejected():
    model = init_model(model_cfg("gpt2-tiny"))
    with pytest.raises(ValueError, match="sequence length 129 exceeds model.max_seq_len=128"):
        model(tokens((1, 129)))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_loss_and_grads(remat):
    from llmjax.train.step import loss_fn

    batch = tokens((2, 17), seed=3)
    results = []
    for policy in ("none", remat):
        graphdef, params = split_model(init_model(model_cfg("llama-tiny", f"model.remat={policy}")))
        results.append(jax.value_and_grad(loss_fn)(params, graphdef, batch))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l0, l1, rtol=3e-6)  # fp32; a GPU's reduction order differs by ~1e-6
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    cfg32 = model_cfg("gpt2-tiny")
    model16 = init_model(model_cfg("gpt2-tiny", "model.dtype=bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    batch = tokens((2, 16), seed=4)
    l32, _ = init_model(cfg32)(batch)
    l16, _ = model16(batch)
    rel = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
    assert rel < 2e-2


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_fused_loss_and_pallas_norms_match_xla(preset):
    from llmjax.train.step import loss_fn

    batch = tokens((2, 17), seed=5)
    results = []
    for impls in (["model.loss_impl=xla", "model.norm_impl=xla"], ["model.loss_impl=fused", "model.norm_impl=pallas"]):
        graphdef, params = split_model(init_model(model_cfg(preset, *impls)))
        with jax.default_matmul_precision("highest"):  # a GPU's default fp32 matmul is TF32
            results.append(jax.value_and_grad(loss_fn)(params, graphdef, batch))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l0, l1, rtol=3e-6)  # fp32; a GPU's reduction order differs by ~1e-6
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), g0, g1)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("bias", [False, True], ids=["rms", "layer"])
def test_add_norm_is_the_residual_add_then_the_norm(bias, impl):
    """ops.add_norm, which the blocks call for every residual add, jitted as the model runs it:
    the sum is x + r rounded to bf16 exactly; normed is the norm of the sum within bf16 rounding
    (XLA may fuse the add and skip its rounding; pallas, on a CPU its reference, normalizes the
    fp32 sum); and the gradient reaches x and r alike, as that of the unfused add and norm does."""
    from llmjax import ops

    keys = jax.random.split(jax.random.key(7), 5)
    x, r, dy = (jax.random.normal(k, (3, 5, 64), jnp.float32).astype(jnp.bfloat16) for k in keys[:3])
    w = 1 + 0.1 * jax.random.normal(keys[3], (64,))
    b = 0.1 * jax.random.normal(keys[4], (64,)) if bias else None
    norm = (lambda v: ops.layer_norm(v, w, b, eps=1e-5)) if bias else (lambda v: ops.rms_norm(v, w, eps=1e-5))
    fused = jax.jit(lambda x, r: ops.add_norm(x, r, w, b, eps=1e-5, impl=impl))
    normed, total = fused(x, r)
    assert jnp.array_equal(total, x + r) and normed.dtype == jnp.bfloat16
    close = lambda a, e: np.testing.assert_allclose(  # noqa: E731
        np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2e-2, atol=2e-2)
    close(normed, norm(x + r))
    dx, dr = jax.grad(lambda x, r: jnp.vdot(fused(x, r)[0].astype(jnp.float32), dy.astype(jnp.float32)),
                      argnums=(0, 1))(x, r)
    expected = jax.grad(lambda s: jnp.vdot(norm(s).astype(jnp.float32), dy.astype(jnp.float32)))(x + r)
    assert jnp.array_equal(dx, dr)
    close(dx, expected)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_pallas_attention_matches_xla(preset):
    """attention_impl=pallas (on a CPU: the flash-attention reference; on a GPU: our kernels, bf16
    tolerance) gives the loss and gradients of attention_impl=xla."""
    from llmjax.train.step import loss_fn

    on_gpu = jax.default_backend() == "gpu"
    dtype = ["model.dtype=bfloat16"] if on_gpu else []
    batch = tokens((2, 33), seed=6)
    results = []
    for impl in ("xla", "pallas"):
        graphdef, params = split_model(init_model(model_cfg(preset, f"model.attention_impl={impl}", *dtype)))
        results.append(jax.value_and_grad(loss_fn)(params, graphdef, batch))
    (l0, g0), (l1, g1) = results
    rtol = 2e-2 if on_gpu else 1e-5
    np.testing.assert_allclose(l0, l1, rtol=rtol)
    # Absolute floor: on a GPU (bf16) some leaves' gradients are ~1e-6 in norm, i.e. zero.
    floor = 1e-5 if on_gpu else 1e-7
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert float(jnp.linalg.norm(x - y)) <= rtol * float(jnp.linalg.norm(x)) + floor


def test_pallas_attention_refuses_an_explicit_mask():
    from llmjax import ops

    q = jnp.ones((1, 4, 2, 16))
    with pytest.raises(ValueError, match="impl='pallas' takes no explicit mask"):
        ops.attention(q, q, q, causal=True, impl="pallas", mask=jnp.ones((1, 4, 4), bool))


@pytest.mark.parametrize("dtype, head_dim, has_mask, on_gpu, expected", [
    (jnp.bfloat16, 64, False, True, "cudnn"),
    (jnp.float16, 128, False, True, "cudnn"),
    (jnp.bfloat16, 36, False, True, "xla"),   # cuDNN needs a multiple of 8
    (jnp.bfloat16, 264, False, True, "xla"),  # and at most 256
    (jnp.float32, 64, False, True, "xla"),
    (jnp.bfloat16, 64, True, True, "xla"),
    (jnp.bfloat16, 64, False, False, "xla"),
])
def test_auto_attention_uses_cudnn_only_where_it_applies(dtype, head_dim, has_mask, on_gpu, expected):
    from llmjax import ops
    assert ops.auto_attention_impl(dtype, head_dim, has_mask=has_mask, on_gpu=on_gpu, hopper=True) == expected


def test_auto_attention_before_hopper_stops_cudnn_at_head_dim_128():
    from llmjax import ops
    assert ops.auto_attention_impl(jnp.bfloat16, 256, has_mask=False, on_gpu=True, hopper=True) == "cudnn"
    assert ops.auto_attention_impl(jnp.bfloat16, 256, has_mask=False, on_gpu=True, hopper=False) == "xla"
    assert ops.auto_attention_impl(jnp.bfloat16, 128, has_mask=False, on_gpu=True, hopper=False) == "cudnn"


@pytest.mark.parametrize("x_shape, w_shape, n_contract", [
    ((1, 1, 16), (16, 4, 8), 1),   # q/k/v projection of one decode token
    ((1, 1, 4, 8), (4, 8, 16), 2),  # output projection
    ((1, 1, 16), (16, 24), 1),     # MLP
    ((2, 3, 16), (16, 4, 8), 1),   # several rows: the plain contraction
])
def test_dense_single_row_gpu_path_equals_the_contraction(monkeypatch, x_shape, w_shape, n_contract):
    from llmjax import ops

    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    monkeypatch.setattr(ops, "_on_gpu", lambda: True)  # the padded-row path, also on the CPU
    with jax.default_matmul_precision("highest"):  # a GPU's default fp32 matmul is TF32
        expected = jnp.tensordot(x, w, n_contract)
        got = ops.dense(x, w, n_contract)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_pads_only_the_products_xla_would_strength_reduce(monkeypatch):
    from llmjax import ops

    monkeypatch.setattr(ops, "_on_gpu", lambda: True)
    monkeypatch.setattr(ops, "XLA_GEMV_TO_REDUCE_BELOW", 16 + 16 * 24)  # a 16 x 24 weight is at it
    x = jnp.ones((1, 1, 16))
    small, large = jnp.ones((16, 23)), jnp.ones((16, 24))
    assert "concatenate" in str(jax.make_jaxpr(lambda x, w: ops.dense(x, w))(x, small))
    assert "concatenate" not in str(jax.make_jaxpr(lambda x, w: ops.dense(x, w))(x, large))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_fused_projections_equal_separate_ones(preset):
    """Training's one-matmul q|k|v and gate|up projections against the separate matmuls that
    decoding runs, with float weights and with an int8 copy (scaled after the matmul)."""
    from llmjax.decode.quantize import quantize_params

    model = init_model(model_cfg(preset, "model.n_heads=4", "model.n_kv_heads=2"), seed=3)
    graphdef, blocks = nnx.split(model.blocks)
    int8 = quantize_params(nnx.state(model), jnp.float32, model.cfg.tie_embeddings)["blocks"]
    x = jax.random.normal(jax.random.key(0), (2, 5, model.cfg.d_model))
    for state in (blocks, int8):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], state))  # the second layer
        for fused, separate in zip(block.attn.project_qkv(x, fused=True), block.attn.project_qkv(x, fused=False)):
            np.testing.assert_allclose(fused, separate, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block.mlp(x, fused=True), block.mlp(x, fused=False), rtol=1e-5, atol=1e-6)
