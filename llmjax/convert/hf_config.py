"""Hugging Face `config.json` <-> `ModelConfig`, for the model types llmjax computes exactly.

`gpt2` (GPT2LMHeadModel) maps to family gpt2; `llama` (LlamaForCausalLM: Llama 2,
TinyLlama, SmolLM2, ...) and `mistral` (MistralForCausalLM, only without a binding
sliding window) map to family llama. A field that would change the computation in a way
llmjax does not implement (RoPE scaling, biases in a Llama, another activation, ...) is
refused with a `ConversionError` rather than silently dropped. Missing fields take the
default of the transformers config class, as `from_pretrained` would.
"""
from __future__ import annotations

from typing import Any

from llmjax.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral")

# Defaults of GPT2Config / LlamaConfig / MistralConfig for the fields read here.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02,
                 scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                 add_cross_attention=False, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.02,
                  tie_word_embeddings=False, attention_bias=False, mlp_bias=False, sliding_window=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, initializer_range=0.02,
                    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, sliding_window=4096),
}
# GPT-2's activations that are exactly 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message names the tensor or field."""


def _refuse(field: str, value: Any, allowed: str, model_type: str):
    raise ConversionError(f"config.json field {field}={value!r} is not supported for model_type "
                          f"{model_type!r}: llmjax needs {allowed}")


def _rope_theta(hf: dict, model_type: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (4.x); plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, entry in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = entry.get("rope_type", entry.get("type", "default"))
        if kind != "default":
            _refuse(f"{field}.rope_type", kind, "'default' (RoPE scaling is not implemented)", model_type)
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _gpt2_fields(get, model_type: str) -> dict:
    checks = (("activation_function", lambda v: v in _TANH_GELUS, f"one of {_TANH_GELUS}"),
              ("scale_attn_weights", lambda v: v is True, "True"),
              ("scale_attn_by_inverse_layer_idx", lambda v: v is False, "False"),
              ("add_cross_attention", lambda v: v is False, "False"))
    for field, ok, allowed in checks:
        if not ok(get(field)):
            _refuse(field, get(field), allowed, model_type)
    d = get("n_embd")
    return dict(family="gpt2", n_layers=get("n_layer"), n_heads=get("n_head"), n_kv_heads=get("n_head"),
                d_model=d, d_mlp=get("n_inner") or 4 * d, vocab_size=get("vocab_size"),
                max_seq_len=get("n_positions"), norm_eps=get("layer_norm_epsilon"))


def _llama_fields(get, hf: dict, model_type: str) -> dict:
    d, n = get("hidden_size"), get("num_attention_heads")
    checks = (("hidden_act", lambda v: v in ("silu", "swish"), "'silu' (or its alias 'swish')"),
              ("attention_bias", lambda v: v is False, "False (no attention biases)"),
              ("mlp_bias", lambda v: v is False, "False (no MLP biases)"),
              ("head_dim", lambda v: v is None or v * n == d, f"hidden_size / num_attention_heads = {d // n}"),
              ("sliding_window", lambda v: v is None or v >= get("max_position_embeddings"),
               "null or >= max_position_embeddings (sliding-window attention is not implemented)"))
    for field, ok, allowed in checks:
        if not ok(get(field)):
            _refuse(field, get(field), allowed, model_type)
    return dict(family="llama", n_layers=get("num_hidden_layers"), n_heads=n,
                n_kv_heads=get("num_key_value_heads") or n, d_model=d, d_mlp=get("intermediate_size"),
                vocab_size=get("vocab_size"), max_seq_len=get("max_position_embeddings"),
                norm_eps=get("rms_norm_eps"), rope_theta=_rope_theta(hf, model_type))


def config_from_hf(hf: dict, *, dtype: str | None = None, param_dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` dict.

    Args:
      hf: the parsed config.json.
      dtype: compute dtype (`ModelConfig.dtype`); None keeps ModelConfig's default.
      param_dtype: dtype the parameters will be held in ("float32" or "bfloat16").
    Returns:
      The ModelConfig (architecture fields from `hf`, the rest defaults).
    Raises:
      ConversionError: unknown model_type, a field llmjax cannot reproduce, or sizes that
        ModelConfig rejects (the ConfigError's message is kept).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"config.json model_type={model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    defaults = _DEFAULTS[model_type]

    def get(field):
        return hf.get(field, defaults[field])

    fields = _gpt2_fields(get, model_type) if model_type == "gpt2" else _llama_fields(get, hf, model_type)
    fields.update(tie_embeddings=bool(get("tie_word_embeddings")), init_std=get("initializer_range"),
                  param_dtype=param_dtype)
    if dtype is not None:
        fields["dtype"] = dtype
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise ConversionError(f"config.json (model_type {model_type!r}) gives an invalid model: {e}") from e


def config_to_hf(cfg: ModelConfig, torch_dtype: str, eos_id: int | None = None) -> dict:
    """The `config.json` dict transformers needs to build the same model.

    GPT-2 family -> GPT2LMHeadModel, Llama family -> LlamaForCausalLM. Dropout is written as
    0 (llmjax has none). RoPE theta is written both as `rope_theta` (transformers 4.x) and
    in `rope_parameters` (5.x).

    Args:
      cfg: the model config.
      torch_dtype: dtype of the saved tensors ("float32", "bfloat16", "float16").
      eos_id: the tokenizer's end-of-text id, written as bos/eos token id (None: null).
    Raises:
      ConversionError: a gpt2-family config with n_kv_heads != n_heads (no GQA in GPT-2).
    """
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.init_std, bos_token_id=eos_id, eos_token_id=eos_id,
                  torch_dtype=torch_dtype, dtype=torch_dtype)
    if cfg.family == "gpt2":
        if cfg.n_kv_heads != cfg.n_heads:
            raise ConversionError(f"model.n_kv_heads={cfg.n_kv_heads} != model.n_heads={cfg.n_heads}: "
                                  "the GPT-2 format has no grouped-query attention")
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.max_seq_len,
                    n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **common)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
                intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
                attention_bias=False, mlp_bias=False, attention_dropout=0.0, **common)
