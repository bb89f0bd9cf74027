"""FLOP and MFU accounting (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B).

Training FLOPs per token = 6·N + 12·L·d·T: 6·N for the forward and backward matmuls of
N weights, 12·L·d·T for the attention scores and values (T = sequence length). A frozen weight
(LoRA's base) counts 4, not 6: it has no gradient of its own.
"""
import jax

from llmjax.config import ModelConfig

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), by jax device_kind prefix.
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
}


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of the routed experts (all layers); 0 for a dense model."""
    if not cfg.n_experts:
        return 0
    per_expert = cfg.d_model * cfg.d_mlp * (3 if cfg.family == "llama" else 2)
    if cfg.family == "gpt2":
        per_expert += cfg.d_mlp + cfg.d_model  # biases
    return cfg.n_layers * cfg.n_experts * per_expert


def matmul_params(cfg: ModelConfig, n_params: int) -> int:
    """Weights a token's matmuls use: all but position embeddings, for an untied model also
    not the input embedding (a lookup, not a matmul), and of the routed experts only the
    top_k / n_experts share each token visits (active parameters)."""
    n = n_params
    experts = expert_params(cfg)
    n -= experts - experts * cfg.moe_top_k // max(cfg.n_experts, 1)
    if cfg.family == "gpt2":
        n -= cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model
    return n


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int, n_frozen: int = 0) -> float:
    """Training FLOPs per token: 6·N + 12·L·d·T, less 2 for each of `n_frozen` matmul weights.

    A frozen weight (LoRA's base) has no gradient of its own: its forward product and the
    backward's product for the activations' gradient make 4, not 6. LoRA's adapters count 6
    each, as if applied as x·A·B; the step merges them into W instead, and what XLA then spends
    on W's gradient is, like rematerialization, work that model FLOPs do not count. n_params:
    every parameter, the frozen ones among them."""
    return 6 * matmul_params(cfg, n_params) - 2 * n_frozen + 12 * cfg.n_layers * cfg.d_model * seq_len


def device_peak_flops(device=None) -> float | None:
    """The bf16 peak of `device` (default: the first device), or None if not in the table."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, peak in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return peak
    return None
