"""Hugging Face import/export against three twins: a plain-numpy HF forward written from the
transformers formulas (hf_reference.py), the exact tensors of hand-built checkpoints, and
(where it is installed) `transformers` itself.

Checkpoints are built from numpy with HF's tensor names and shapes, never by the code under
test; the numpy forward runs in float64.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from llmjax.config import ModelConfig, load_config
from llmjax.convert import ConversionError, load_hf, load_hf_model, read_header, save_hf, write_safetensors
from llmjax.data.tokenizer import ByteTokenizer, load_tokenizer
from llmjax.models import init_model, split_model
from tests.convert.hf_reference import numpy_logits

GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=96, n_positions=32,
            n_embd=32, n_layer=2, n_head=4, n_inner=80, activation_function="gelu_new",
            layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0)  # tie_word_embeddings absent: default True
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=96, hidden_size=32,
             intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
             tie_word_embeddings=False)
CASES = {
    "gpt2-tied": GPT2,
    "gpt2-untied": {**GPT2, "tie_word_embeddings": False},
    "llama-gqa-untied": LLAMA,
    # transformers 5 style RoPE field; multi-query (one kv head); tied head.
    "llama-mqa-tied": {**{k: v for k, v in LLAMA.items() if k != "rope_theta"}, "num_key_value_heads": 1,
                       "tie_word_embeddings": True,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0}},
    "mistral": {**LLAMA, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                "sliding_window": None},
}
TOKENS = np.random.default_rng(7).integers(0, 96, (2, 11))


# ---------------------------------------------------------------------------------------
# Building checkpoints by hand.

def hf_tensors(hf: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random tensors with HF names and torch shapes for a config.json dict."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    def norm(d):
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(dtype)

    t = {}
    if hf["model_type"] == "gpt2":
        d, f, v = hf["n_embd"], hf["n_inner"], hf["vocab_size"]
        t["transformer.wte.weight"] = w(v, d, scale=0.5)
        t["transformer.wpe.weight"] = w(hf["n_positions"], d, scale=0.2)
        for i in range(hf["n_layer"]):
            p = f"transformer.h.{i}."
            t[p + "ln_1.weight"], t[p + "ln_1.bias"] = norm(d), w(d, scale=0.1)
            t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"] = w(d, 3 * d), w(3 * d, scale=0.1)
            t[p + "attn.c_proj.weight"], t[p + "attn.c_proj.bias"] = w(d, d), w(d, scale=0.1)
            t[p + "ln_2.weight"], t[p + "ln_2.bias"] = norm(d), w(d, scale=0.1)
            t[p + "mlp.c_fc.weight"], t[p + "mlp.c_fc.bias"] = w(d, f), w(f, scale=0.1)
            t[p + "mlp.c_proj.weight"], t[p + "mlp.c_proj.bias"] = w(f, d), w(d, scale=0.1)
        t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = norm(d), w(d, scale=0.1)
        if not hf.get("tie_word_embeddings", True):
            t["lm_head.weight"] = w(v, d, scale=0.5)
        return t
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    h = d // hf["num_attention_heads"]
    qd, kd = hf["num_attention_heads"] * h, hf["num_key_value_heads"] * h
    t["model.embed_tokens.weight"] = w(v, d, scale=0.5)
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(d)
        t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"] = w(qd, d), w(kd, d)
        t[p + "self_attn.v_proj.weight"], t[p + "self_attn.o_proj.weight"] = w(kd, d), w(d, qd)
        t[p + "post_attention_layernorm.weight"] = norm(d)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = w(f, d), w(f, d)
        t[p + "mlp.down_proj.weight"] = w(d, f)
    t["model.norm.weight"] = norm(d)
    if not hf["tie_word_embeddings"]:
        t["lm_head.weight"] = w(v, d, scale=0.5)
    return t


def write_checkpoint(path, hf: dict, tensors: dict, n_shards: int = 1):
    """config.json + model.safetensors, or n shards with model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    if n_shards == 1:
        write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
        return path
    weight_map = {}
    for k, names in enumerate(np.array_split(list(tensors), n_shards), 1):
        file = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(path / file, {n: tensors[n] for n in names}, {"format": "pt"})
        weight_map.update(dict.fromkeys(names.tolist(), file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def read_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, single-file or sharded."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update({n: r.load() for n, r in read_header(file)[0].items()})
    return out


def merged_model(cfg, params):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


def llmjax_logits(cfg, params, tokens):
    with jax.default_matmul_precision("highest"):  # no TF32 when this runs on a GPU
        return np.asarray(merged_model(cfg, params)(jnp.asarray(tokens, jnp.int32))[0])


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """llmjax params of the right tree and shapes, random numpy (no init_model run)."""
    rng = np.random.default_rng(seed)
    abstract = split_model(nnx.eval_shape(lambda: init_model(cfg)))[1]
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)


def small_cfg(family: str, tied: bool, **kw) -> ModelConfig:
    return ModelConfig(family=family, n_layers=2, n_heads=4, n_kv_heads=2 if family == "llama" else 4,
                       d_model=32, d_mlp=72, vocab_size=96, max_seq_len=32, tie_embeddings=tied,
                       rope_theta=250000.0 if family == "llama" else 10000.0, dtype="float32", **kw)


# ---------------------------------------------------------------------------------------
# Import.

@pytest.mark.parametrize("case", CASES)
def test_loaded_params_have_llmjax_tree_and_logits_match_numpy_hf(tmp_path, case):
    hf = CASES[case]
    tensors = hf_tensors(hf)
    cfg, params = load_hf(write_checkpoint(tmp_path, hf, tensors), dtype="float32")
    want = split_model(nnx.eval_shape(lambda: init_model(cfg)))[1]
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert jax.tree.leaves(jax.tree.map(lambda p, w: (p.shape, p.dtype), params, want)) == \
        jax.tree.leaves(jax.tree.map(lambda w: (w.shape, w.dtype), want))
    err = np.abs(llmjax_logits(cfg, params, TOKENS) - numpy_logits(hf, tensors, TOKENS)).max()
    assert err < 1e-4, f"{case}: max abs logit error {err}"


def test_config_fields_are_read(tmp_path):
    cfg, _ = load_hf(write_checkpoint(tmp_path, CASES["llama-mqa-tied"], hf_tensors(CASES["llama-mqa-tied"])))
    assert (cfg.family, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, cfg.rope_theta, cfg.tie_embeddings,
            cfg.norm_eps, cfg.max_seq_len, cfg.param_dtype) == \
        ("llama", 4, 1, 72, 25000.0, True, 1e-6, 64, "float32")


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    tensors = hf_tensors(LLAMA)
    _, single = load_hf(write_checkpoint(tmp_path / "one", LLAMA, tensors))
    _, sharded = load_hf(write_checkpoint(tmp_path / "three", LLAMA, tensors, n_shards=3))
    assert jax.tree.all(jax.tree.map(np.array_equal, single, sharded))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_half_precision_tensors_convert_to_param_dtype(tmp_path, dtype, param_dtype):
    tensors = hf_tensors(LLAMA, dtype=dtype)
    _, params = load_hf(write_checkpoint(tmp_path, LLAMA, tensors), param_dtype=param_dtype)
    wq = params["blocks"]["attn"]["wq"]
    assert wq.dtype == jnp.dtype(param_dtype)
    want = tensors["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 4, 8).astype(param_dtype)
    assert wq[1].tobytes() == want.tobytes()


def test_original_gpt2_names_and_buffers_are_accepted(tmp_path):
    """The OpenAI upload has no `transformer.` prefix and stores the causal-mask buffers."""
    tensors = hf_tensors(GPT2)
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy |= {f"h.{i}.attn.bias": np.ones((1, 1, 32, 32), np.float32) for i in range(2)}
    legacy |= {f"h.{i}.attn.masked_bias": np.array(-1e4, np.float32) for i in range(2)}
    _, want = load_hf(write_checkpoint(tmp_path / "new", GPT2, tensors))
    _, got = load_hf(write_checkpoint(tmp_path / "old", GPT2, legacy))
    assert jax.tree.all(jax.tree.map(np.array_equal, want, got))


def test_load_hf_model_returns_model_and_tokenizer(tmp_path):
    hf = CASES["gpt2-tied"]
    path = write_checkpoint(tmp_path, hf, hf_tensors(hf))
    cfg, model, tokenizer = load_hf_model(path, dtype="float32")
    assert tokenizer is None and cfg.dtype == "float32"
    load_tokenizer("bundled").save(path / "tokenizer.json")
    _, model, tokenizer = load_hf_model(path, dtype="float32")
    assert tokenizer.encode("To be, or not") == load_tokenizer("bundled").encode("To be, or not")
    with jax.default_matmul_precision("highest"):
        logits, _ = model(jnp.asarray(TOKENS, jnp.int32))
    assert np.abs(np.asarray(logits) - numpy_logits(hf, hf_tensors(hf), TOKENS)).max() < 1e-4


# ---------------------------------------------------------------------------------------
# Export and round trips.

@pytest.mark.parametrize("family, tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_llmjax_hf_llmjax_round_trip_is_bit_identical(tmp_path, family, tied, param_dtype):
    cfg = small_cfg(family, tied, param_dtype=param_dtype)
    params = random_params(cfg)
    save_hf(cfg, params, tmp_path)
    cfg2, params2 = load_hf(tmp_path, dtype=cfg.dtype, param_dtype=param_dtype)
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and a.tobytes() == b.tobytes(), params, params2)
    assert jax.tree.all(same)
    assert ("lm_head.weight" in read_tensors(tmp_path)) == (not tied)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == param_dtype and written["tie_word_embeddings"] == tied


@pytest.mark.parametrize("case", CASES)
def test_hf_llmjax_hf_round_trip_keeps_every_tensor(tmp_path, case):
    """Export writes exactly the hand-built HF tensors back: names, shapes and bytes."""
    hf = CASES[case]
    tensors = hf_tensors(hf)
    cfg, params = load_hf(write_checkpoint(tmp_path / "in", hf, tensors))
    save_hf(cfg, params, tmp_path / "out")
    out = read_tensors(tmp_path / "out")
    assert sorted(out) == sorted(tensors)
    for name, want in tensors.items():
        assert out[name].shape == want.shape and out[name].tobytes() == want.tobytes(), name
    assert load_hf(tmp_path / "out")[0] == cfg


def test_save_hf_shards_and_replaces_stale_files(tmp_path):
    cfg = small_cfg("llama", False)
    params = random_params(cfg, seed=3)
    save_hf(cfg, params, tmp_path, max_shard_bytes=30_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert all(p.stat().st_size < 30_000 + 4096 for p in tmp_path.glob("model-*.safetensors"))
    _, back = load_hf(tmp_path, dtype="float32")
    assert jax.tree.all(jax.tree.map(np.array_equal, params, back))
    save_hf(cfg, params, tmp_path)  # unsharded now: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_save_hf_casts_and_writes_tokenizer(tmp_path):
    cfg = small_cfg("gpt2", True)
    tokenizer = load_tokenizer("bundled")
    save_hf(cfg, merged_model(cfg, random_params(cfg)), tmp_path, tokenizer=tokenizer, dtype="bfloat16")
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["eos_token_id"] == tokenizer.eos_id
    assert {r.dtype for r in read_header(tmp_path / "model.safetensors")[0].values()} == {"BF16"}
    assert load_tokenizer(tmp_path).encode("Wherefore art thou") == tokenizer.encode("Wherefore art thou")


# ---------------------------------------------------------------------------------------
# Errors.

def _edited(tmp_path, case="llama-gqa-untied", config=None, drop=(), add=None):
    hf = {**CASES[case], **(config or {})}
    tensors = {k: v for k, v in hf_tensors(CASES[case]).items() if k not in drop}
    return write_checkpoint(tmp_path, hf, tensors | (add or {}))


@pytest.mark.parametrize("edit, match", [
    (dict(config={"model_type": "bert"}), "model_type='bert'.*supported: gpt2, llama, mistral"),
    (dict(drop=["model.layers.1.self_attn.k_proj.weight"]),
     r"'model.layers.1.self_attn.k_proj.weight' is missing.*expected shape \[16, 32\]"),
    (dict(drop=["lm_head.weight"]), r"'lm_head.weight' is missing.*expected shape \[96, 32\]"),
    (dict(case="gpt2-tied", add={"transformer.h.0.attn.c_attn.weight": np.zeros((32, 95), np.float32)}),
     r"'transformer.h.0.attn.c_attn.weight'.*shape \[32, 95\]; expected shape \[32, 96\]"),
    (dict(add={"model.norm.weight": np.ones(32, np.float64)}),
     "'model.norm.weight'.*dtype F64.*supported: F32, BF16, F16"),
    (dict(add={"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}),
     r"1 tensor\(s\) with no place.*q_proj.bias"),
    (dict(case="mistral", config={"sliding_window": 16}), "sliding_window=16"),
    (dict(config={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "rope_scaling.rope_type='llama3'"),
    (dict(config={"attention_bias": True}), "attention_bias=True"),
    (dict(case="gpt2-tied", config={"activation_function": "relu"}), "activation_function='relu'"),
    (dict(config={"num_key_value_heads": 3}), "n_kv_heads=3"),
])
def test_bad_checkpoints_raise_clear_errors(tmp_path, edit, match):
    with pytest.raises(ConversionError, match=match):
        load_hf(_edited(tmp_path, **edit))


def test_missing_paths_and_files_raise_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_hf(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConversionError, match="is a file"):
        load_hf(tmp_path / "file.txt")
    with pytest.raises(ConversionError, match="has no config.json"):
        load_hf(tmp_path)
    path = _edited(tmp_path / "ckpt")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"neither model.safetensors.*pytorch_model.bin"):
        load_hf(path)
    path = write_checkpoint(tmp_path / "sharded", LLAMA, hf_tensors(LLAMA), n_shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="names shard 'model-00002-of-00002.safetensors'"):
        load_hf(path)


def test_save_hf_rejects_what_it_cannot_write(tmp_path):
    cfg = small_cfg("llama", False)
    params = random_params(cfg)
    gqa_gpt2 = dataclasses.replace(cfg, family="gpt2")
    with pytest.raises(ConversionError, match="n_kv_heads=2 != model.n_heads=4"):
        save_hf(gqa_gpt2, random_params(gqa_gpt2), tmp_path)
    bad = jax.tree.map(lambda x: x, params)
    bad["blocks"]["attn"]["wq"] = bad["blocks"]["attn"]["wq"][:, :, :3]
    with pytest.raises(ConversionError, match=r"'blocks.attn.wq' has shape \[2, 32, 3, 8\]; expected \[2, 32, 4, 8\]"):
        save_hf(cfg, bad, tmp_path)
    with pytest.raises(ConversionError, match="ByteTokenizer has no .save"):
        save_hf(cfg, params, tmp_path, tokenizer=ByteTokenizer())
    assert not tmp_path.joinpath("config.json").exists()  # nothing written on error


# ---------------------------------------------------------------------------------------
# Against transformers itself (runs where torch + transformers are installed).

@pytest.fixture
def hf_lib():
    """(torch, transformers), or skip: they are an optional test extra."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _transformers_logits(hf_lib, path, tokens, model_type):
    torch, transformers = hf_lib
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM}[model_type]
    model, info = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                      output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model.eval()(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_match_transformers(tmp_path, hf_lib, case):
    hf = CASES[case]
    tensors = hf_tensors(hf)
    path = write_checkpoint(tmp_path, hf, tensors, n_shards=2 if case == "mistral" else 1)
    want = _transformers_logits(hf_lib, path, TOKENS, hf["model_type"])
    cfg, params = load_hf(path, dtype="float32")
    assert np.abs(llmjax_logits(cfg, params, TOKENS) - want).max() < 1e-4
    assert np.abs(numpy_logits(hf, tensors, TOKENS) - want).max() < 1e-4  # the numpy twin is right too


@pytest.mark.parametrize("family, tied", [("gpt2", True), ("gpt2", False), ("llama", False), ("llama", True)])
def test_exported_checkpoints_load_in_transformers_with_same_logits(tmp_path, hf_lib, family, tied):
    cfg = small_cfg(family, tied)
    params = random_params(cfg, seed=5)
    save_hf(cfg, params, tmp_path, max_shard_bytes=50_000 if family == "llama" else None)
    got = _transformers_logits(hf_lib, tmp_path, TOKENS, family)
    assert np.abs(got - llmjax_logits(cfg, params, TOKENS)).max() < 1e-4


def test_moe_model_has_no_hf_export_yet(tmp_path):
    cfg = load_config(overrides=["preset=llama-moe-tiny"]).model
    with pytest.raises(ConversionError, match="n_experts=.*no Hugging Face export"):
        save_hf(cfg, split_model(init_model(cfg))[1], tmp_path)
