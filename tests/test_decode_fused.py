"""The fused decode step (llmjax.decode.fused) against the model's own layers, and the matvec
reference's pieces against the model code they restate."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import ops
from llmjax.config import DecodeConfig, load_config
from llmjax.decode import fused, generate
from llmjax.decode.generate import prepare_decode, split_layers
from llmjax.decode.quantize import quantize
from llmjax.models import init_model
from llmjax.models.transformer import apply_rope, rope_tables
from pallas_kernels import _testing
from pallas_kernels.matvec import matvec, reference
from tests.decode_steps import steps_both_ways

TINY = ["preset=llama-tiny"]


def _steps_both_ways(dm, prompt, tokens, interpret, fused_too=True):
    """steps_both_ways with the fused step (interpret: Pallas interpret mode)."""
    kernel = ((lambda net, layers, caches: (fused.layer_weights(net, layers), caches)),
              functools.partial(fused.step_logits, interpret=interpret))
    return steps_both_ways(dm, prompt, tokens, kernel if fused_too else None)


def _check_caches(ours, theirs, dtype):
    """Every layer's cached keys and values (rope'd keys included) as the model's layers wrote them."""
    for mine, model in zip(ours, theirs):
        for name in ("k", "v"):
            _testing.assert_close(mine[name], model[name], dtype, f"cached {name}")


@pytest.mark.parametrize("rows,int8,tied,prompt_len", [
    (2, False, False, 4), (2, True, False, 14), (1, False, True, 126), (1, True, True, 4)],
    ids=["bf16-2rows", "int8-2rows-in-place", "bf16-1row-tied-in-place", "int8-1row-tied"])
def test_fused_step_matches_the_model_layers(rows, int8, tied, prompt_len, monkeypatch):
    """Two steps of the fused kernels (Pallas interpret mode; one row takes the FMA path, two the
    tensor-core one) give the unfused step's logits and KV cache. Caches of 16 positions (prompt
    14) and 128 (prompt 126: two pages of 64, two splits that the decode kernel merges itself)
    are written by the q|k|v kernel in place and read by the decode kernel; one of 6 positions
    (no page size for the decode kernel) takes attend_cached."""
    model = init_model(load_config(overrides=[*TINY, f"model.tie_embeddings={tied}"]).model, seed=1)
    dm = prepare_decode(model, int8=int8, dtype="bfloat16")
    prompt, tokens = (jax.random.randint(jax.random.key(i), (rows, n), 0, 512, dtype=jnp.int32)
                      for i, n in ((0, prompt_len), (1, 2)))
    qkv_caches = []  # each q|k|v call's caches argument, recorded as the fused step is traced

    def spy(x, w, **options):
        if "head_groups" in options:
            qkv_caches.append(options.get("caches"))
        return matvec(x, w, **options)

    monkeypatch.setattr(fused, "matvec", spy)
    merged = _testing.record_split_merges(monkeypatch)  # whether each decode kernel merged its splits
    ours, theirs, caches_ours, caches = _steps_both_ways(dm, prompt, tokens, interpret=True)
    assert qkv_caches and len(qkv_caches) % model.cfg.n_layers == 0  # a call a layer in each trace
    assert all((caches is not None) == (prompt_len > 4) for caches in qkv_caches)
    assert bool(merged) == (prompt_len > 4)  # the decode kernel reads every cache with a page size
    assert all(m == (prompt_len == 126) for m in merged)
    for a, b in zip(ours, theirs):
        assert a.dtype == jnp.float32 and a.shape == b.shape == (rows, 512)
        _testing.assert_close(a, b, jnp.bfloat16, "fused step logits")
    _check_caches(caches_ours, caches, jnp.bfloat16)


def test_generate_takes_the_fused_loop_where_it_applies(monkeypatch):
    """generate with the fused loop (forced on; on a CPU the matvec falls back to its reference)
    gives the unfused loop's greedy tokens, and decode.fused_matvec=false turns it off."""
    generate_module = importlib.import_module("llmjax.decode.generate")
    monkeypatch.setattr(fused, "applies", lambda cfg, rows: True)
    model = init_model(load_config(overrides=TINY).model, seed=1)  # fp32: no near-ties from rounding
    prompt = jax.random.randint(jax.random.key(0), (1, 5), 0, 512, dtype=jnp.int32)
    results = {}
    for on in (True, False):
        cfg = DecodeConfig(max_new_tokens=8, temperature=0.0, fused_matvec=on)
        options = generate_module._generate_args(prepare_decode(model), prompt, cfg, None, None)[1]
        assert options["step_kind"] == ("fused" if on else "xla")
        results[on] = generate(model, prompt, cfg)
    np.testing.assert_array_equal(results[True], results[False])


def test_applies_only_to_dense_half_precision_llama_at_batch_1(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the checks past the platform's
    config = lambda *o: load_config(overrides=list(o)).model  # noqa: E731
    llama = config(*TINY, "model.dtype=bfloat16")
    assert fused.applies(llama, 1)
    assert not fused.applies(llama, 2)  # batches over 1 keep XLA's layers (not yet measured faster)
    assert not fused.applies(config("preset=gpt2-tiny", "model.dtype=bfloat16"), 1)  # LayerNorm, GELU, biases
    assert not fused.applies(config(*TINY), 1)  # fp32
    assert not fused.applies(config(*TINY, "model.dtype=bfloat16", "model.n_experts=4"), 1)
    assert not fused.applies(config(*TINY, "model.dtype=bfloat16", "model.d_mlp=98"), 1)  # 4 columns a program
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not fused.applies(llama, 1)
    model = init_model(config("preset=gpt2-tiny"))
    with pytest.raises(ValueError, match="family='gpt2'"):
        fused.layer_weights(model, split_layers(model))
    tiny = init_model(config(*TINY))
    assert fused.weights_supported(prepare_decode(tiny, int8=True, dtype="bfloat16").params)
    assert not fused.weights_supported({"codes": jnp.zeros((4,), jnp.uint8)})  # e.g. NF4 codes


def test_matvec_reference_restates_the_model_code():
    """The kernel reference's norm, rope and int8 quantization are bit for bit the model's
    (ops.rms_norm, transformer.apply_rope, decode.quantize), so the fused step and the model round
    in the same places."""
    x = jnp.asarray(_testing.normal("restate/x", (3, 64)), jnp.bfloat16)
    g = jnp.asarray(_testing.normal("restate/g", (64,), 0.2, 1.0), jnp.bfloat16)
    assert jnp.array_equal(reference.rms_normalized(x, g, 1e-5), ops.rms_norm(x, g, eps=1e-5))
    cos, sin = rope_tables(jnp.array([[3], [70], [500]], jnp.int32), 16, 10000.0)  # [3, 1, 1, 8]
    turned = reference.rotated(x, cos[:, 0, 0], sin[:, 0, 0], rotated_heads=4)  # all 4 heads of 16
    assert jnp.array_equal(turned, apply_rope(x.reshape(3, 1, 4, 16), cos, sin).reshape(3, 64))
    w = jnp.asarray(_testing.normal("restate/w", (16, 64)), jnp.float32).at[3].set(0.0)
    values, scale = reference.quantize_rows(w, jnp.bfloat16)
    model = quantize(w, (1,), jnp.bfloat16)
    assert jnp.array_equal(values, model.values) and jnp.array_equal(scale, model.scale[:, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("prompt_len", [16, 29, 381], ids=["attend-cached", "in-place", "in-place-merged-splits"])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_fused_step_is_as_close_to_fp32_as_the_model_layers_gpu(int8, prompt_len):
    """Llama 1.1B's shapes (random weights, 4 of its 22 layers): bf16 roundings in different places
    drift apart over the layers (~2% in the logits at 22), so both bf16 steps are held against the
    model's layers in fp32 (the same int8 weights where quantized): the fused step may not be
    further off than the unfused one, with 25% slack; its KV cache matches the model's. A cache
    of 19 positions takes attend_cached, one of 32 the in-place write and the decode kernel, one
    of 384 (the benchmark's) that with six splits merged inside the decode kernel."""
    model = init_model(load_config(overrides=["preset=llama-1b", "model.n_layers=4"]).model, seed=1)
    prompt, tokens = (jax.random.randint(jax.random.key(i), (1, n), 0, 32000, dtype=jnp.int32)
                      for i, n in ((0, prompt_len), (1, 3)))
    ours, theirs, caches_ours, caches = _steps_both_ways(prepare_decode(model, int8=int8, dtype="bfloat16"),
                                                         prompt, tokens, False)
    _, exact, _, _ = _steps_both_ways(prepare_decode(model, int8=int8, dtype="float32"), prompt, tokens, False,
                                      fused_too=False)
    for a, b, ref in zip(ours, theirs, exact):
        fused_error, unfused_error = _testing.relative_error(a, ref), _testing.relative_error(b, ref)
        assert fused_error <= 1.25 * unfused_error + 1e-3, (fused_error, unfused_error)
    _check_caches(caches_ours, caches, jnp.bfloat16)
