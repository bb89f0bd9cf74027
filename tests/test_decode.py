"""KV-cache generation against full recomputation, and the samplers."""
import dataclasses
import importlib
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import DecodeConfig, load_config
from llmjax.decode import generate, sample_logits
from llmjax.models import init_model


def greedy_by_recompute(model, prompt, n):
    """The definition: rerun the whole sequence for every new token, no cache. The sequence is
    zero-padded to its final length (causal: padding never reaches earlier positions), so one
    compiled forward serves every step."""
    b, t0 = prompt.shape
    forward = jax.jit(lambda seq: model(seq)[0])
    seq = jnp.zeros((b, t0 + n), jnp.int32).at[:, :t0].set(prompt)
    for i in range(t0, t0 + n):
        seq = seq.at[:, i].set(jnp.argmax(forward(seq)[:, i - 1], -1).astype(jnp.int32))
    return seq


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_cached_generation_equals_recompute(preset):
    model = init_model(load_config(overrides=[f"preset={preset}"]).model, seed=1)
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 512, dtype=jnp.int32)
    cached = generate(model, prompt, DecodeConfig(max_new_tokens=12, temperature=0.0))
    np.testing.assert_array_equal(cached, greedy_by_recompute(model, prompt, 12))


def test_steps_stops_early_inside_the_same_program():
    model = init_model(load_config(overrides=["preset=gpt2-tiny"]).model, seed=1)
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 512, dtype=jnp.int32)
    cfg = DecodeConfig(max_new_tokens=12, temperature=0.0)
    full = generate(model, prompt, cfg)
    early = generate(model, prompt, cfg, steps=4)
    np.testing.assert_array_equal(early[:, :9], full[:, :9])
    assert not early[:, 9:].any()  # not generated: the buffer's zeros
    for bad in (0, 13, 2.0):
        with pytest.raises(ValueError, match=rf"steps={bad!r} must be an int in \[1, decode.max_new_tokens=12\]"):
            generate(model, prompt, cfg, steps=bad)


def test_prompt_plus_new_tokens_past_max_len_is_rejected():
    model = init_model(load_config(overrides=["preset=gpt2-tiny"]).model)
    with pytest.raises(ValueError, match=r"prompt length 100 \+ decode.max_new_tokens=50 = 150 exceeds"):
        generate(model, jnp.zeros((1, 100), jnp.int32), DecodeConfig(max_new_tokens=50))


def test_samplers():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = jnp.argmax(logits, -1)
    keys = jax.random.split(jax.random.key(1), 20)
    np.testing.assert_array_equal(sample_logits(logits, keys[0], temperature=0.0), greedy)
    for key in keys:  # top_k=1, a tiny top_p and a tiny temperature all leave only the argmax
        np.testing.assert_array_equal(sample_logits(logits, key, top_k=1), greedy)
        np.testing.assert_array_equal(sample_logits(logits, key, top_p=1e-6), greedy)
        # logits of ~1000 at the smallest normal-range temperature: unshifted, they would overflow
        np.testing.assert_array_equal(sample_logits(logits * 300, key, temperature=1e-37, top_p=0.5), greedy)
    # top_k=5: every draw is among the 5 largest logits of its row, and more than one occurs.
    draws = np.stack([sample_logits(logits, k, top_k=5) for k in keys])
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    assert all(np.isin(draws[:, r], top5[r]).all() for r in range(4))
    assert len(np.unique(draws[:, 0])) > 1
    # top_p=0.9: draws stay inside the smallest set holding 90% of the mass.
    probs = np.asarray(jax.nn.softmax(logits, -1))
    draws = np.stack([sample_logits(logits, k, top_p=0.9) for k in keys])
    for r in range(4):
        order = np.argsort(-probs[r])
        nucleus = order[: np.searchsorted(np.cumsum(probs[r][order]), 0.9) + 1]
        assert np.isin(draws[:, r], nucleus).all()


def test_sampling_is_seeded():
    model = init_model(load_config(overrides=["preset=llama-tiny"]).model)
    prompt = jnp.ones((1, 3), jnp.int32)
    cfg = DecodeConfig(max_new_tokens=16, temperature=1.0, seed=7)
    tokens = generate(model, prompt, cfg)
    np.testing.assert_array_equal(tokens, generate(model, prompt, cfg))
    other_seed = generate(model, prompt, dataclasses.replace(cfg, seed=8))
    greedy = generate(model, prompt, dataclasses.replace(cfg, temperature=0.0))
    assert not np.array_equal(tokens, other_seed) and not np.array_equal(tokens, greedy)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_single_row_decoded_as_two_rows_matches(temperature, monkeypatch):
    """A batch-1 prompt decoded as two identical rows (what a GPU does, see
    doubles_single_row) gives one row of the same tokens, greedy and sampled."""
    generate_module = importlib.import_module("llmjax.decode.generate")  # the package's
    # `generate` attribute is the function
    model = init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=1)
    prompt = jax.random.randint(jax.random.key(0), (1, 5), 0, 512, dtype=jnp.int32)
    cfg = DecodeConfig(max_new_tokens=10, temperature=temperature, seed=3)
    results = {}
    for double in (False, True):
        monkeypatch.setattr(generate_module, "doubles_single_row", lambda prompt, double=double: double)
        options = generate_module._generate_args(generate_module.prepare_decode(model), prompt, cfg,
                                                 None, None)[1]
        assert options["double"] is double  # the program below takes the doubled path
        results[double] = generate(model, prompt, cfg)
    assert results[True].shape == (1, 15)
    np.testing.assert_array_equal(results[True], results[False])
    if temperature == 0.0:
        np.testing.assert_array_equal(results[True], greedy_by_recompute(model, prompt, 10))


def test_bench_decode_smoke(tmp_path):
    from experiments import bench_decode

    assert bench_decode.main(["--smoke", "--models", "llama-tiny", "--sections", "decode", "speculative",
                              "--out", str(tmp_path), "--hlo-dir", str(tmp_path / "hlo")]) == 0
    assert "ENTRY" in (tmp_path / "hlo" / "generate-llama-tiny-b1.hlo.txt").read_text()
    (result,) = tmp_path.glob("decode-smoke-llama-tiny-decode-speculative_*.json")
    assert result.with_suffix(".png").exists()
    rows = json.loads(result.read_text())["rows"]
    decode = [r for r in rows if r["section"] == "decode"]
    assert [(r["weights"], r["batch"]) for r in decode] == [("bf16", 1), ("bf16", 2), ("int8", 1)]
    assert all(r["roofline_ms"] > 0 and "ms_per_token" in r for r in decode)  # values: CPU noise
    assert decode[2]["weight_bytes"] < 0.65 * decode[0]["weight_bytes"]  # the bf16 embedding stays
    spec = [r for r in rows if r["section"] == "speculative"]
    assert [r["later_layer_scale"] for r in spec] == [0.0, 1.0]
    # Scale 0: the target computes its early exit (up to float rounding of a 1- vs 5-token pass).
    assert spec[0]["alpha"] > 0.9 and spec[0]["tokens_per_round"] > 0.9 * (spec[0]["gamma"] + 1)
    assert spec[0]["alpha"] > spec[1]["alpha"] and 1 <= spec[1]["tokens_per_round"] <= spec[0]["tokens_per_round"]


@pytest.mark.parametrize("argv, named", [(["--gamma", "0"], "--gamma 0"), (["--models", "gpt2-tni"], "['gpt2-tni']"),
                                         (["--ppl-run", "/no/such/run"], "--ppl-run /no/such/run")])
def test_bench_decode_names_bad_options_before_measuring(argv, named, capsys):
    from experiments import bench_decode
    with pytest.raises(SystemExit):
        bench_decode.main(["--smoke", *argv])
    assert named in capsys.readouterr().err


def test_decode_loop_has_no_per_step_weight_casts_or_layer_slices():
    """The compiled generate program, checked the way bench_decode checks it on a GPU: with
    weights prepared once, no weight-sized convert or dynamic-slice (a stacked-layer slice)
    remains; handing the fp32 params of a bf16 model straight in shows the per-step casts."""
    from experiments.bench_decode import SETTINGS, generate_hlo, large_casts_and_copies
    from flax import nnx

    from llmjax.decode import DecodeModel, prepare_decode

    wide = ["preset=llama-tiny", "model.d_model=128", "model.d_mlp=256"]
    model = init_model(load_config(overrides=wide).model)  # fp32 compute: CPU dots need no casts
    found = large_casts_and_copies(model.cfg, generate_hlo(prepare_decode(model), SETTINGS["smoke"]))
    assert not [f for f in found if not f.startswith("copy")], found  # CPU may relayout wo
    bf16 = init_model(load_config(overrides=[*wide, "model.dtype=bfloat16"]).model)
    graphdef, fp32_params = nnx.split(bf16)
    found = large_casts_and_copies(bf16.cfg, generate_hlo(DecodeModel(graphdef, fp32_params, bf16.cfg),
                                                          SETTINGS["smoke"]))
    assert any(f.startswith("convert bf16[1,128,2,32]") for f in found), found  # wk cast each step


def test_generate_program_takes_its_arguments_like_generate():
    """bench_decode profiles generate's compiled program (its jit's compiler options rule out a
    profiler's enclosing jit): the program and its argument builder give generate's tokens."""
    from llmjax.decode import prepare_decode
    from llmjax.decode.generate import generate_program

    model = prepare_decode(init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=1))
    prompt = jax.random.randint(jax.random.key(0), (1, 4), 0, 512, dtype=jnp.int32)
    cfg = DecodeConfig(max_new_tokens=6, temperature=0.0)
    program, args = generate_program(model, prompt, cfg)
    for n in (1, 6):
        np.testing.assert_array_equal(program(*args(n)), generate(model, prompt, cfg, steps=n))


def test_bench_decode_kv_smoke(tmp_path):
    """The kv section: engine decode rows with bf16 and int8 pools of one tiny model."""
    from experiments import bench_decode

    assert bench_decode.main(["--smoke", "--sections", "kv", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("decode-smoke-kv_*.json")
    assert result.with_suffix(".png").exists()
    kv = [r for r in json.loads(result.read_text())["rows"] if r["section"] == "kv"]
    assert [(r["kv_dtype"], r["slots"]) for r in kv] == [("bfloat16", 2), ("int8", 2)]
    assert all(r["tokens_per_s"] > 0 for r in kv)  # values: CPU noise
    head_dim = 16  # llama-tiny: d_model 64 over 4 heads
    assert kv[1]["bytes_vs_bf16"] == pytest.approx((head_dim + 2) / (2 * head_dim))
    assert kv[1]["kv_bytes_per_step"] < 0.6 * kv[0]["kv_bytes_per_step"]


def test_kernels_per_token_is_the_long_run_less_the_one_token_run():
    """bench_decode's CUPTI table: per kernel (numeric suffixes merged), (long - short) / steps."""
    from experiments.bench_decode import kernels_per_token

    long = [("loop_fusion.1", 1.0), ("loop_fusion.7", 1.0), ("sm90_xmma_gemm_bf16", 3.0), ("flash_fwd", 0.5)]
    short = [("loop_fusion.3", 0.2), ("sm90_xmma_gemm_bf16", 0.6)]
    out = kernels_per_token(long, short, steps=2)
    assert out["top_kernels_per_token"] == [("sm90_xmma_gemm_bf16", 1.2, 0.0), ("loop_fusion", 0.9, 0.5),
                                            ("flash_fwd", 0.25, 0.5)]
    assert out["kernel_ms_per_token"] == pytest.approx(2.35) and out["kernel_launches_per_token"] == 1.0
    assert out["kernel_ms_per_token_by_class"] == pytest.approx({"matmul": 1.2, "attention": 0.25, "other": 0.9})


def test_decode_program_concatenates_no_weights(monkeypatch):
    """Decoding keeps q/k/v and gate/up apart: fused, the side-by-side weights would be
    concatenated inside the token loop, a copy of them every token (benchmarks/NOTES.md)."""
    from llmjax.decode.generate import lower_generate
    from llmjax.models import transformer

    def weight_concatenations(overrides):
        model = init_model(load_config(overrides=["preset=llama-tiny", *overrides]).model)
        text = lower_generate(model, jnp.zeros((1, 4), jnp.int32), DecodeConfig(max_new_tokens=4)).as_text()
        shapes = re.findall(r"stablehlo\.concatenate .*-> tensor<([\dx]+)x\w+>", text)
        smallest = model.cfg.d_model * model.cfg.n_kv_heads * model.cfg.head_dim  # wk
        return [s for s in shapes if math.prod(int(d) for d in s.split("x")) >= smallest]

    assert weight_concatenations([]) == []
    original = transformer.Attention.project_qkv
    monkeypatch.setattr(transformer.Attention, "project_qkv", lambda self, x, fused=True: original(self, x))
    assert set(weight_concatenations(["model.d_mlp=192"])) == {"64x2x4x16"}  # what the check catches
