"""int8 KV cache: quantization error bound, decode attention over int8 pages (reference and the
Pallas kernel in interpret mode) against full-precision KV, perplexity of a briefly trained
model with int8 KV, the engine serving from int8 pages, and bad-input errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from llmjax.config import load_config
from llmjax.data import ByteTokenizer, load_corpus
from llmjax.decode import paged
from llmjax.decode.engine import Engine, EngineConfig
from llmjax.models import init_model
from llmjax.rag.kv_store import kv_perplexity
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.decode_attention.reference import dequantize_pages, quantize_pages

# 8-bit KV attention vs the same KV unquantized: ||out - ref|| / ||ref|| below these. int8: each
# element is off by at most half a step (absmax/254); fp8 e4m3 keeps 3 mantissa bits (relative
# step 1/8 to 1/16). Measured on these random inputs: int8 5.0e-3, fp8 2.1e-2 (both backends).
ATTENTION_RTOL = {jnp.int8: 1.5e-2, jnp.float8_e4m3fn: 4e-2}


def _pages(seed, pool=12, page_size=8, kv_heads=2, head_dim=16):
    keys = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(keys[0], (pool, page_size, kv_heads, head_dim))
    v = jax.random.normal(keys[1], (pool, page_size, kv_heads, head_dim))
    q = jax.random.normal(keys[2], (3, 4, head_dim))
    tables = jnp.asarray(np.random.default_rng(seed).permutation(pool)[:12].reshape(3, 4), jnp.int32)
    return q, k, v, tables, jnp.asarray([32, 9, 1], jnp.int32)


def test_quantize_pages_int8_error_within_half_a_step():
    # Magnitudes over 12 decades: bf16 scales keep fp32's exponent range.
    x = jax.random.normal(jax.random.key(0), (5, 7, 3, 16)) * jnp.logspace(-6, 6, 7)[None, :, None, None]
    q, scale = quantize_pages(x)
    assert q.dtype == jnp.int8 and scale.shape == x.shape[:-1] and scale.dtype == jnp.bfloat16
    # The stored scale is absmax / 127 rounded up to bf16: never below it, at most 2^-7 above.
    exact = jnp.max(jnp.abs(x), axis=-1) / 127
    ratio = scale.astype(jnp.float32) / exact
    assert bool(jnp.all((ratio >= 1) & (ratio <= 1 + 2 ** -7))), (ratio.min(), ratio.max())
    error = jnp.abs(dequantize_pages(q, scale) - x)
    assert bool(jnp.all(error <= scale.astype(jnp.float32)[..., None] * (0.5 + 1e-5)))
    assert bool(jnp.all(jnp.abs(q).max(-1) >= 126))  # the absmax maps to (nearly) the top code
    zeros_q, zeros_scale = quantize_pages(jnp.zeros((2, 4)))
    assert not jnp.any(zeros_q) and not jnp.any(zeros_scale)


@pytest.mark.parametrize("codes", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
@pytest.mark.parametrize("backend,interpret", [("reference", False), ("triton", True)])
def test_8bit_decode_attention_close_to_full_precision(backend, interpret, codes):
    q, k, v, tables, lengths = _pages(1)
    (k8, ks), (v8, vs) = quantize_pages(k, codes), quantize_pages(v, codes)
    assert k8.dtype == codes
    out = paged_decode_attention(q, k8, v8, tables, lengths, k_scales=ks, v_scales=vs, backend=backend,
                                 interpret=interpret)
    full = paged_decode_attention(q, k, v, tables, lengths, backend="reference")
    rel = float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full))
    assert rel < ATTENTION_RTOL[codes], rel
    # The dequantized values exactly: int8 attention equals attention over page * scale.
    exact = paged_decode_attention(q, dequantize_pages(k8, ks), dequantize_pages(v8, vs), tables, lengths,
                                   backend="reference")
    np.testing.assert_allclose(out, exact, rtol=1e-5, atol=1e-5)


def test_int8_pages_bad_inputs():
    q, k, v, tables, lengths = _pages(2)
    (k8, ks), (v8, vs) = quantize_pages(k), quantize_pages(v)
    with pytest.raises(ValueError, match="int8/fp8 pages need k_scales and v_scales"):
        paged_decode_attention(q, k8, v8, tables, lengths, backend="reference")
    with pytest.raises(ValueError, match=r"k_scales must be bfloat16 of shape \(12, 8, 2\)"):
        paged_decode_attention(q, k8, v8, tables, lengths, k_scales=ks[:, :4], v_scales=vs,
                               backend="reference")
    with pytest.raises(ValueError, match="kv_dtype='fp4'"):
        EngineConfig(kv_dtype="fp4")


def _train_briefly(steps=40):
    """gpt2-tiny on byte windows of the first play: loss falls from ~6.2 to ~3 in 40 steps."""
    model = init_model(load_config(overrides=["preset=gpt2-tiny"]).model, seed=0)
    data = np.asarray(ByteTokenizer().encode(load_corpus("shakespeare")[0][:60000]), np.int32)
    rng = np.random.default_rng(0)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        starts = rng.integers(0, len(data) - 65, 16)
        step(model, optimizer, jnp.asarray(np.stack([data[s:s + 65] for s in starts])))
    held_out = data[-4 * 65:].reshape(4, 65)
    return model, held_out


def test_8bit_kv_perplexity_change_is_small():
    model, windows = _train_briefly()
    full = kv_perplexity(model, windows, block_size=16)
    assert full < 40  # it learned something (a uniform byte model: 257)
    for kv_dtype in ("int8", "fp8"):
        changed = kv_perplexity(model, windows, kv_dtype=kv_dtype, block_size=16)
        assert abs(changed - full) / full < 0.01, (kv_dtype, full, changed)


def test_engine_serves_from_int8_pages():
    model = init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=4)
    cfg = EngineConfig(max_slots=2, prefill_slots=1, chunk_size=16, block_size=8, num_blocks=16)
    prompt = np.random.default_rng(3).integers(0, 512, 20).tolist()
    engines = {}
    for kv_dtype in ("model", "int8"):
        engines[kv_dtype] = engine = Engine(model, EngineConfig(**{**cfg.__dict__, "kv_dtype": kv_dtype}))
        request = engine.submit(prompt, 6)
        assert len(engine.run()[request].generated) == 6
    full, int8 = engines["model"].pages[0], engines["int8"].pages[0]
    assert int8["k_pages"].dtype == jnp.int8 and full["k_pages"].dtype == jnp.float32
    # Layer 0's keys and values of the prompt depend on the prompt alone, so the int8 engine
    # wrote the full engine's values within half a quantization step. A fresh pool hands out
    # blocks 0, 1, 2: position p sits in block p // 8, slot p % 8.
    for name in ("k", "v"):
        stored = full[f"{name}_pages"][0].reshape(-1, *full[f"{name}_pages"].shape[3:])[:len(prompt)]
        scales = int8[f"{name}_scales"][0].reshape(-1, int8[f"{name}_scales"].shape[-1])[:len(prompt)]
        codes = int8[f"{name}_pages"][0].reshape(-1, *stored.shape[1:])[:len(prompt)]
        assert bool(jnp.all(jnp.abs(dequantize_pages(codes, scales) - stored)
                            <= scales.astype(jnp.float32)[..., None] * (0.5 + 1e-5))), name
        assert bool(jnp.any(stored != 0))
    bf16 = paged.init_paged_cache(model.cfg, 4, 8, dtype="bfloat16")
    int8_pool = paged.init_paged_cache(model.cfg, 4, 8, kv_dtype="int8")
    # head_dim 16: 16 bytes + a 2-byte scale vs 32 bytes per head and position
    assert paged.kv_bytes_per_token(int8_pool) / paged.kv_bytes_per_token(bf16) == pytest.approx(18 / 32)


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("head_dim,most", [(64, 0.52), (128, 0.51)])
def test_8bit_pool_bytes_about_half_of_bf16(head_dim, most, kv_dtype):
    """Bytes per position summed over the pool's arrays (codes and bf16 scales, all layers)."""
    cfg = load_config(overrides=["preset=llama-tiny", f"model.d_model={4 * head_dim}", "model.n_heads=4",
                                 "model.n_kv_heads=2"]).model
    assert cfg.head_dim == head_dim
    bf16 = paged.init_paged_cache(cfg, 4, 8, kv_dtype="bfloat16")
    pool = paged.init_paged_cache(cfg, 4, 8, kv_dtype=kv_dtype)
    assert pool["k_scales"].dtype == jnp.bfloat16 and pool["k_scales"].shape == pool["k_pages"].shape[:-1]
    ratio = paged.kv_bytes_per_token(pool) / paged.kv_bytes_per_token(bf16)
    assert ratio == pytest.approx((head_dim + 2) / (2 * head_dim)) and ratio <= most


def test_rag_kv_report_smoke(tmp_path, monkeypatch):
    """`python -m experiments.rag --kv` end to end on a random gpt2-tiny (the code path and the
    report's invariants; numbers from a random model mean nothing)."""
    from experiments import rag

    monkeypatch.setattr(rag, "RESULTS", tmp_path)
    rag.main(["--kv", "--windows", "2", "--reps", "1", "--kv-dtypes", "bfloat16", "int8"])
    (result,) = tmp_path.glob("rag-kv_*.json")
    assert result.with_suffix(".png").exists()
    rows = {r.get("section_part", r["kv_dtype"]): r for r in json.loads(result.read_text())}
    assert set(rows) == {"bfloat16", "int8", "int8_vs_bf16", "load_vs_prefill"}
    head_dim = rows["int8"]["head_dim"]
    assert rows["int8_vs_bf16"]["bytes_ratio"] == pytest.approx((head_dim + 2) / (2 * head_dim))
    assert rows["bfloat16"]["tokens_per_s"] > 0 and rows["int8"]["tokens_per_s"] > 0
    assert abs(rows["int8"]["ppl_change"]) < 0.01
