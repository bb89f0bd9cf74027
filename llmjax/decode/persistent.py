"""A Llama decode step as one persistent kernel (pallas_kernels.decode_step), for batch 1.

Where `fused.step_logits` launches ~124 kernels a token, this runs the whole step (every
layer's q|k|v, attention, o, gate|up and down, then the head) in one Mosaic GPU kernel that
streams the weights through every SM and orders the phases with grid barriers. The weights are
the fused step's, stacked over layers once per generate call; the KV cache is one array for all
layers, [layers, S, K, H] with S a multiple of 64 (`stack_caches`). The kernel writes the new
token's rotated k and its v; this step stores them into the cache.

The attention inside the kernel takes heads of 64 dims in GQA groups of an even size up to 30
(Llama 1.1B's 32 q heads over 4 kv heads, Llama 3.2 1B's over 8), so `applies` holds for those
shapes only. The grid barriers need a CTA on every SM at once: where
the process gets only part of the GPU (an MPS share of the SMs), a CTA never starts and the step
waits forever, so set decode.persistent_step=false there.
"""
import jax
import jax.numpy as jnp

from llmjax.decode import fused
from llmjax.models.transformer import rope_tables
from llmjax.ops import Int8Weight
from pallas_kernels.decode_step import attention as kernel_attention
from pallas_kernels.decode_step import run_phases
from pallas_kernels.decode_step.chains import llama
from pallas_kernels.weight_stream.mosaic_stream import TILE_K, TILE_N


ATTENTION_SPLITS = 8  # step_logits' default


def applies(cfg, rows: int) -> bool:
    """Whether the persistent step takes this model: on a Hopper GPU (wgmma, TMA reduce-adds)
    with an SM for each of its attention units, one row, a dense Llama-family model in bfloat16
    with heads the kernel's attention takes and weights its tiles divide."""
    device = jax.devices()[0]
    return (jax.default_backend() == "gpu" and getattr(device, "compute_capability", None) == "9.0"
            and rows == 1 and shape_fits(cfg) and jnp.dtype(cfg.dtype) == jnp.bfloat16
            and cfg.n_kv_heads * ATTENTION_SPLITS <= device.core_count)


def shape_fits(cfg) -> bool:
    """The kernel takes the model's shape: Llama family, dense, heads of 64 in groups the
    attention takes (`attention.check_heads`), d_model and d_mlp multiples of 256 and a
    vocabulary that is a multiple of 64."""
    try:
        kernel_attention.check_heads(cfg.n_heads, cfg.n_kv_heads)
    except ValueError:
        return False
    return (cfg.family == "llama" and not cfg.n_experts and cfg.head_dim == kernel_attention.HEAD_DIM
            and cfg.d_model % TILE_K == 0 and cfg.d_mlp % TILE_K == 0 and cfg.vocab_size % TILE_N == 0)


def weights_supported(params) -> bool:
    """Whether the kernel reads these weights: `fused.weights_supported`'s, none of them int8
    (its tiles are bfloat16)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    return fused.weights_supported(params) and not any(isinstance(leaf, Int8Weight) for leaf in leaves)


def step_weights(model, layers) -> dict:
    """The kernel's weights from `fused.layer_weights`: q|k|v, o, gate|up, down stacked over
    layers, the head, and the norms ([layers, D] twice, [1, D]).

    Raises:
      ValueError: int8 weights (the kernel reads bfloat16 tiles).
    """
    w = fused.layer_weights(model, layers)
    if any(scale is not None for layer in w["layers"] for scale in
           (layer["qkv"][1], layer["o"][1], layer["gate_up"][1], layer["down"][1])) or w["head"][1] is not None:
        raise ValueError("the persistent decode step reads bfloat16 weights; got int8 (decode.int8=true)")
    stack = lambda name: jnp.stack([layer[name][0] for layer in w["layers"]])  # noqa: E731
    gate_up = stack("gate_up")  # [L, 2, F, D]
    return dict(weights=[stack("qkv"), stack("o"), gate_up.reshape(gate_up.shape[0], -1, gate_up.shape[-1]),
                         stack("down"), w["head"][0]],
                norms=[jnp.stack([layer["attn_norm"] for layer in w["layers"]]).astype(jnp.float32),
                       jnp.stack([layer["mlp_norm"] for layer in w["layers"]]).astype(jnp.float32),
                       w["final_norm"].reshape(1, -1).astype(jnp.float32)])


def stack_caches(caches) -> tuple:
    """Layer caches (`init_layer_caches`, batch 1) as the kernel's (k, v): [layers, S, K, H],
    S padded to a multiple of 64 (the padding is never read: the kernel masks past pos)."""
    k, v = (jnp.concatenate([c[name][:, 0] for c in caches]) for name in ("k", "v"))
    pad = -k.shape[1] % kernel_attention.BLOCK
    return tuple(jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))


def step_logits(model, weights, tokens, positions, cache, *, attention_splits: int = ATTENTION_SPLITS,
                concurrent: int = 3, interpret: bool = False):
    """One decode step: tokens, positions [1, 1] -> fp32 logits [1, V] and the updated (k, v)
    cache (`stack_caches`). weights: from `step_weights`. attention_splits: CTAs a kv head
    (the cache's chunks split between them; on an H100, 6 splits took the step from 1.082 to
    1.004 ms at 2 slots (bench_kernels decode_step, 2026-12-06), and 8 are ~1% faster than 6
    from 320 positions on, where the last split, which takes the new token, has no chunk of its
    own). concurrent: weight tiles in flight a CTA (on an H100, 3 are ~0.4% faster than 2, and
    4 no faster than 3: benchmarks/NOTES.md, twenty-fourth session).
    interpret: Pallas interpret mode (CPU tests)."""
    cfg = model.cfg
    n_layers = cfg.n_layers
    shapes, _, *chain = llama(n_layers, cfg.d_model, cfg.d_mlp, cfg.vocab_size, attention_splits=attention_splits,
                              q_heads=cfg.n_heads, kv_heads=cfg.n_kv_heads)
    h0 = model.embed_tokens(tokens, positions)[0, 0].astype(jnp.float32)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    pos = positions[0, 0]
    k, v = cache
    out = run_phases(weights["weights"], weights["norms"], {"h": h0}, *chain, layers=n_layers,
                     cache=(k, v, pos.reshape(1), jnp.stack([cos.reshape(-1), sin.reshape(-1)])),
                     eps=cfg.norm_eps, concurrent=concurrent, interpret=interpret)
    new_kv = out["new_kv"].reshape(n_layers, cfg.n_kv_heads, 2, cfg.head_dim).astype(k.dtype)  # (k, v) a head
    k = jax.lax.dynamic_update_slice(k, new_kv[:, None, :, 0], (0, pos, 0, 0))
    v = jax.lax.dynamic_update_slice(v, new_kv[:, None, :, 1], (0, pos, 0, 0))
    return out["logits"], (k, v)
