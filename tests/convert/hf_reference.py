"""The Hugging Face forward pass in plain numpy (float64), written from the formulas of
transformers' modeling_gpt2.py and modeling_llama.py: the twin the converter tests check
llmjax's logits against. Takes HF tensor names and torch layouts, nothing from llmjax.

T length, N heads, K kv heads, H head dim.
"""
import numpy as np


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v):
    """q [T, N, H], k/v [T, K, H] -> [T, N*H]; kv head j serves query heads j*G..(j+1)*G-1."""
    t, n, h = q.shape
    k, v = np.repeat(k, n // k.shape[1], axis=1), np.repeat(v, n // v.shape[1], axis=1)  # repeat_kv
    scores = np.einsum("tnh,snh->nts", q, k) * h ** -0.5
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    return np.einsum("nts,snh->tnh", _softmax(scores), v).reshape(t, n * h)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rms_norm(x, w, eps):
    return w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps))


def _gpt2_forward(hf, t, ids):
    g = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}
    d, n, eps = hf["n_embd"], hf["n_head"], hf["layer_norm_epsilon"]
    x = g["wte.weight"][ids] + g["wpe.weight"][np.arange(len(ids))]
    for i in range(hf["n_layer"]):
        p = f"h.{i}."
        a = _layer_norm(x, g[p + "ln_1.weight"], g[p + "ln_1.bias"], eps)
        qkv = a @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]  # Conv1D: x @ W[in, out] + b
        q, k, v = (m.reshape(len(ids), n, d // n) for m in np.split(qkv, 3, axis=-1))
        x = x + _causal_attention(q, k, v) @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
        m = _layer_norm(x, g[p + "ln_2.weight"], g[p + "ln_2.bias"], eps)
        m = m @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"]
        m = 0.5 * m * (1 + np.tanh(np.sqrt(2 / np.pi) * (m + 0.044715 * m ** 3)))  # gelu_new
        x = x + m @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, g["ln_f.weight"], g["ln_f.bias"], eps)
    return x @ g.get("lm_head.weight", g["wte.weight"]).T


def _llama_forward(hf, t, ids):
    g = {k: v.astype(np.float64) for k, v in t.items()}
    d, n, kh, eps = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
    h, T = d // n, len(ids)
    theta = hf.get("rope_parameters", {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
    freqs = np.arange(T)[:, None] * inv_freq
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1))[:, None], np.sin(np.concatenate([freqs, freqs], -1))[:, None]

    def rope(z):  # q * cos + rotate_half(q) * sin
        return z * cos + np.concatenate([-z[..., h // 2:], z[..., :h // 2]], -1) * sin

    x = g["model.embed_tokens.weight"][ids]
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = _rms_norm(x, g[p + "input_layernorm.weight"], eps)
        q = rope((a @ g[p + "self_attn.q_proj.weight"].T).reshape(T, n, h))  # nn.Linear: x @ W.T
        k = rope((a @ g[p + "self_attn.k_proj.weight"].T).reshape(T, kh, h))
        v = (a @ g[p + "self_attn.v_proj.weight"].T).reshape(T, kh, h)
        x = x + _causal_attention(q, k, v) @ g[p + "self_attn.o_proj.weight"].T
        m = _rms_norm(x, g[p + "post_attention_layernorm.weight"], eps)
        gate, up = m @ g[p + "mlp.gate_proj.weight"].T, m @ g[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g[p + "mlp.down_proj.weight"].T  # silu(gate) * up
    x = _rms_norm(x, g["model.norm.weight"], eps)
    return x @ g.get("lm_head.weight", g["model.embed_tokens.weight"]).T


def numpy_logits(hf: dict, tensors: dict, tokens) -> np.ndarray:
    """Logits [B, T, V] float64 of the HF model (config.json dict, HF-named tensors) on tokens [B, T]."""
    forward = _gpt2_forward if hf["model_type"] == "gpt2" else _llama_forward
    return np.stack([forward(hf, tensors, ids) for ids in tokens])
