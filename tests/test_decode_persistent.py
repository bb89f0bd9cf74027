"""The persistent decode step (llmjax.decode.persistent: one Mosaic GPU kernel a token) against
the model's own layers."""
import functools
import importlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from llmjax.config import DecodeConfig, load_config
from llmjax.decode import fused, persistent
from llmjax.decode.generate import prepare_decode, split_layers
from llmjax.models import init_model
from pallas_kernels import _testing
from tests.decode_steps import steps_both_ways

# A preset's attention shape, one layer (decode_step's tests loop over two) and a narrow MLP and
# vocabulary.
NARROW = ["model.n_layers=1", "model.d_mlp=256", "model.vocab_size=256", "model.max_seq_len=256"]


def _steps_both_ways(dm, prompt, tokens, interpret, attention_splits=1, persistent_too=True):
    """steps_both_ways with the persistent step (interpret: Pallas interpret mode)."""
    kernel = ((lambda net, layers, caches: (persistent.step_weights(net, layers), persistent.stack_caches(caches))),
              functools.partial(persistent.step_logits, attention_splits=attention_splits, interpret=interpret))
    return steps_both_ways(dm, prompt, tokens, kernel if persistent_too else None)


def _check_cache(ours, theirs):
    """The persistent step's (k, v) cache holds what the model's layers wrote, position by position."""
    for mine, name in zip(ours, ("k", "v")):
        model = jnp.concatenate([c[name][:, 0] for c in theirs])  # [layers, S, K, H]
        _testing.assert_close(mine[:, :model.shape[1]], model, jnp.bfloat16, f"cached {name}")


@pytest.mark.parametrize("preset", ["llama-1b", "llama3.2-1b"])
def test_persistent_step_matches_the_model_layers(preset):
    """Two steps after a 70-token prompt (two cache chunks, the second part full), in Pallas
    interpret mode: the logits and the cache the model's layers give, at bf16 tolerance; with
    Llama 1.1B's 8 q heads a kv head and untied head, or Llama 3.2 1B's 4 and tied head."""
    model = init_model(load_config(overrides=[f"preset={preset}", *NARROW]).model, seed=1)
    dm = prepare_decode(model, dtype="bfloat16")
    prompt, tokens = (jax.random.randint(jax.random.key(i), (1, n), 0, 256, dtype=jnp.int32) for i, n in ((0, 70), (1, 2)))
    ours, theirs, cache_ours, caches = _steps_both_ways(dm, prompt, tokens, interpret=True)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (1, 256) and a.dtype == jnp.float32
        _testing.assert_close(a, b, jnp.bfloat16, "persistent step logits")
    _check_cache(cache_ours, caches)


def test_applies_to_the_kernels_shape_only(monkeypatch):
    config = lambda *o: load_config(overrides=list(o)).model  # noqa: E731
    assert persistent.shape_fits(config("preset=llama-1b"))  # 8 q heads a kv head
    assert persistent.shape_fits(config("preset=llama3.2-1b"))  # 4
    assert not persistent.shape_fits(config("preset=llama-1b", "model.n_heads=24", "model.d_model=1536",
                                            "model.n_kv_heads=8"))  # 3: an odd group
    assert not persistent.shape_fits(config("preset=llama-tiny"))  # heads of 16
    assert not persistent.shape_fits(config("preset=gpt2-tiny"))
    llama_1b = config("preset=llama-1b", "model.dtype=bfloat16")
    many_kv = config("preset=llama-1b", "model.dtype=bfloat16", "model.n_heads=64", "model.d_model=4096",
                     "model.n_kv_heads=32")  # 32 kv heads x 8 splits: more attention units than SMs
    assert persistent.shape_fits(many_kv)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as on a Hopper GPU, so each
    for capability, rows, expected in (("9.0", 1, True), ("9.0", 2, False), ("8.0", 1, False)):  # check can fail
        monkeypatch.setattr(jax, "devices", lambda c=capability: [
            type("Gpu", (), {"compute_capability": c, "core_count": 132})()])
        assert persistent.applies(llama_1b, rows) is expected, (capability, rows)
        assert not persistent.applies(many_kv, rows)
    assert not persistent.applies(config("preset=llama-1b", "model.dtype=float32"), 1)


def test_int8_weights_are_rejected():
    model = init_model(load_config(overrides=["preset=llama-1b", *NARROW]).model, seed=1)
    dm = prepare_decode(model, int8=True, dtype="bfloat16")
    net = nnx.merge(dm.graphdef, dm.params)
    with pytest.raises(ValueError, match="reads bfloat16 weights; got int8"):
        persistent.step_weights(net, split_layers(net))


@pytest.mark.gpu
@pytest.mark.parametrize("attention_splits", [1, 8])
@pytest.mark.parametrize("prompt_len", [29, 381])
@pytest.mark.parametrize("preset", ["llama-1b", "llama3.2-1b"])
def test_persistent_step_is_as_close_to_fp32_as_the_model_layers_gpu(preset, prompt_len, attention_splits):
    """Llama 1.1B's or 3.2 1B's shapes (random weights, 4 layers), as the fused step's GPU test:
    the persistent step may not be further off the model's fp32 layers than the bf16 layers
    are, with 25% slack; its cache matches theirs."""
    model = init_model(load_config(overrides=[f"preset={preset}", "model.n_layers=4"]).model, seed=1)
    prompt, tokens = (jax.random.randint(jax.random.key(i), (1, n), 0, model.cfg.vocab_size, dtype=jnp.int32)
                      for i, n in ((0, prompt_len), (1, 3)))
    ours, theirs, cache_ours, caches = _steps_both_ways(prepare_decode(model, dtype="bfloat16"), prompt, tokens,
                                                        False, attention_splits)
    _, exact, _, _ = _steps_both_ways(prepare_decode(model, dtype="float32"), prompt, tokens, False,
                                      persistent_too=False)
    for a, b, ref in zip(ours, theirs, exact):
        ours_error, layers_error = _testing.relative_error(a, ref), _testing.relative_error(b, ref)
        assert ours_error <= 1.25 * layers_error + 1e-3, (ours_error, layers_error)
    _check_cache(cache_ours, caches)


def test_generate_picks_the_persistent_step_where_asked_and_it_applies(monkeypatch):
    """decode.persistent_step (on by default) routes the token loop to the persistent step where it
    applies (forced here), before the fused loop; int8 weights or persistent_step=false take the
    fused loop, and with fused_matvec=false too, XLA's layers."""
    generate_module = importlib.import_module("llmjax.decode.generate")
    monkeypatch.setattr(persistent, "applies", lambda cfg, rows: True)
    monkeypatch.setattr(fused, "applies", lambda cfg, rows: True)
    model = init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=1)
    prompt = jnp.zeros((1, 5), jnp.int32)

    def kind(int8=False, **options):
        cfg = DecodeConfig(max_new_tokens=4, temperature=0.0, **options)
        return generate_module._generate_args(prepare_decode(model, int8=int8), prompt, cfg, None, None)[1]["step_kind"]

    assert kind() == "persistent"
    assert kind(persistent_step=False) == "fused"
    assert kind(int8=True) == "fused"
    assert kind(fused_matvec=False) == "persistent"
    assert kind(persistent_step=False, fused_matvec=False) == "xla"
