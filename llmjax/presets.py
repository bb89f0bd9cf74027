"""Model presets: one dict of partial `ModelConfig` overrides per name (gpt-fast style).

Selected with `preset: <name>` in YAML or `preset=<name>` on the command line; fields
set under `model:` still win. Parameter counts: `llmjax.models.count_params`.
"""

PRESETS: dict[str, dict] = {
    # For tests: seconds to compile and run on a CPU.
    "gpt2-tiny": dict(family="gpt2", n_layers=2, n_heads=4, n_kv_heads=4, d_model=64, d_mlp=256,
                      vocab_size=512, max_seq_len=128, dtype="float32"),
    # GPT-2 (Radford et al. 2019): 124,439,808 and 354,823,168 parameters with tied embeddings.
    "gpt2-small": dict(family="gpt2", n_layers=12, n_heads=12, n_kv_heads=12, d_model=768,
                       d_mlp=3072, vocab_size=50257, max_seq_len=1024),
    "gpt2-medium": dict(family="gpt2", n_layers=24, n_heads=16, n_kv_heads=16, d_model=1024,
                        d_mlp=4096, vocab_size=50257, max_seq_len=1024),
    "llama-tiny": dict(family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=176,
                       vocab_size=512, max_seq_len=128, tie_embeddings=False, dtype="float32"),
    # MoE twins of the tiny presets: 8 experts, top-2, each expert half the dense width, so a
    # token's active feed-forward parameters equal the dense preset's (plus a D x 8 router).
    "gpt2-moe-tiny": dict(family="gpt2", n_layers=2, n_heads=4, n_kv_heads=4, d_model=64, d_mlp=128,
                          vocab_size=512, max_seq_len=128, dtype="float32", n_experts=8, moe_top_k=2),
    "llama-moe-tiny": dict(family="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_mlp=88,
                           vocab_size=512, max_seq_len=128, tie_embeddings=False, dtype="float32",
                           n_experts=8, moe_top_k=2),
    # TinyLlama-1.1B's shape: 22 layers, GQA 32/4, SwiGLU 5632, 32k vocab, untied head.
    "llama-1b": dict(family="llama", n_layers=22, n_heads=32, n_kv_heads=4, d_model=2048,
                     d_mlp=5632, vocab_size=32000, max_seq_len=2048, tie_embeddings=False),
    # Llama-3.2-1B's shape: 16 layers, GQA 32/8, SwiGLU 8192, 128,256 vocab, tied head, RoPE
    # theta 500,000 (without Llama 3's long-context rescaling of the rotary frequencies, which
    # changes the rotary table, not the shapes or the cost).
    "llama3.2-1b": dict(family="llama", n_layers=16, n_heads=32, n_kv_heads=8, d_model=2048,
                        d_mlp=8192, vocab_size=128256, max_seq_len=2048, tie_embeddings=True,
                        rope_theta=500000.0),
}
