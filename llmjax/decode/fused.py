"""A Llama decode step built from fused matrix-vector kernels (pallas_kernels.matvec).

A batch-1 decode step reads every weight once; the rest of its time is the ~300 small kernels
around the GEMMs (norms, residual adds, SwiGLU, split-K reductions, the one-row pads), each a
launch of a few microseconds. Here a block is four weight reads, each one kernel with its
neighbours folded in:

    q   = rope(RMSNorm(x) Wqkv)    (norm in the prologue, rope of q and k in the epilogue; the
                                    q, k, v weights as one [(N + 2K) H, D]; k and v stored
                                    into the KV cache at this token's slot by the same kernel)
    x   = x + attention(...) Wo    (residual in the epilogue)
    h   = silu(RMSNorm(x) Wg) * (RMSNorm(x) Wu)   (norm, both projections and SwiGLU in one)
    x   = x + h Wdown
    logits = RMSNorm(x) Whead      (fp32)

plus the decode attention kernel over the cache (its splits merged by the last of them). That
holds for a contiguous cache in the model's dtype that the decode kernel reads
(`kv_cache.decode_kernel_reads`: generate's own);
other caches (paged, int8 KV, lengths without a page size) get q, k, v back from the kernel
and `attend_cached` writes and reads them.
The kernels read weights as [out, in] rows; `layer_weights` transposes them once per generate
call, before the token loop (a second copy of the layer weights while generate runs). Llama
family (RMSNorm, SwiGLU, no biases), dense, up to 16 rows; generate uses it for one.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import kv_cache
from llmjax.models.transformer import rope_tables
from llmjax.ops import Int8Weight
from pallas_kernels.matvec import config as matvec_config, matvec


def _as_rows(value, n_in: int):
    """A weight [1, *in, *out] (leading layer axis) as ([out, in] rows, int8 scale [out] or None)."""
    if isinstance(value, Int8Weight):
        values = value.values[0]
        rows = values.reshape(math.prod(values.shape[:n_in]), -1).T
        return rows, value.scale[0].reshape(-1)
    value = value[0]
    return value.reshape(math.prod(value.shape[:n_in]), -1).T, None


def _weight_shapes(cfg) -> list[tuple[int, int, int | None]]:
    """(N, K, rotary head width or None) of each matrix the step multiplies by."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return [(qkv, cfg.d_model, cfg.head_dim), (cfg.d_model, cfg.n_heads * cfg.head_dim, None),
            (cfg.d_mlp, cfg.d_model, None), (cfg.d_model, cfg.d_mlp, None), (cfg.vocab_size, cfg.d_model, None)]


def applies(cfg, rows: int) -> bool:
    """Whether `generate` runs `step_logits`: on a GPU, for a dense Llama-family model in half
    precision, one row (the case measured faster than XLA's layers; step_logits itself takes up to
    16), and weight shapes the kernel's blocks divide."""
    return (jax.default_backend() == "gpu" and cfg.family == "llama" and not cfg.n_experts
            and rows == 1 and jnp.dtype(cfg.dtype) in (jnp.bfloat16, jnp.float16)
            and all(matvec_config.kernel_gap(n, k, matvec_config.default_blocks(n, k, rows), head_dim) is None
                    for n, k, head_dim in _weight_shapes(cfg)))


def weights_supported(params) -> bool:
    """Whether every weight is a plain array on one device or an Int8Weight (layer_weights reads
    those; NF4 codes or sharded weights would need their own path)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Int8Weight))
    arrays = [leaf.values if isinstance(leaf, Int8Weight) else leaf for leaf in leaves]
    return all(isinstance(a, jax.Array) and (isinstance(b, Int8Weight) or jnp.issubdtype(a.dtype, jnp.floating))
               and len(a.devices()) == 1 for a, b in zip(arrays, leaves))


def layer_weights(model, layers) -> dict:
    """The step's weights from a model and its `split_layers` states: per layer the q|k|v rows
    [(N + 2K) H, D], o [D, N H], gate|up [2, F, D], down [D, F] (each with its int8 scales
    or None) and the two norm scales; the head [V, D] and the final norm. Computed once, before
    the token loop (inside it XLA would redo the transposes every step).

    Raises:
      ValueError: a model that is not a dense Llama-family one (LayerNorm, GELU, biases and
        experts have no fused step).
    """
    cfg = model.cfg
    if cfg.family != "llama" or cfg.n_experts:
        raise ValueError(f"the fused decode step takes a dense Llama-family model; got family="
                         f"{cfg.family!r}, n_experts={cfg.n_experts}")
    block_def, _ = nnx.split(model.blocks)
    out = []
    for state in layers:
        block = nnx.merge(block_def, state)
        attn, mlp = block.attn, block.mlp
        parts = [_as_rows(getattr(attn, n).get_value(), 1) for n in ("wq", "wk", "wv")]
        qkv = jnp.concatenate([p[0] for p in parts])
        qkv_scale = None if parts[0][1] is None else jnp.concatenate([p[1] for p in parts])
        gate, up = (_as_rows(getattr(mlp, n).get_value(), 1) for n in ("w_gate", "w_in"))
        out.append(dict(
            qkv=(qkv, qkv_scale), o=_as_rows(attn.wo.get_value(), 2),
            gate_up=(jnp.stack([gate[0], up[0]]), None if gate[1] is None else jnp.stack([gate[1], up[1]])),
            down=_as_rows(mlp.w_out.get_value(), 1),
            attn_norm=block.attn_norm.scale[...][0], mlp_norm=block.mlp_norm.scale[...][0]))
    if model.lm_head is None:  # tied: the embedding [V, D] is already out x in
        embed = model.embed.get_value()
        head = ((embed.values, embed.scale.reshape(-1)) if isinstance(embed, Int8Weight)
                else (embed.astype(cfg.dtype), None))
    else:
        head = _as_rows(jax.tree.map(lambda a: a[None], model.lm_head.get_value()), 1)
    return dict(layers=out, head=head, final_norm=model.final_norm.scale[...])


def step_logits(model, weights, tokens, positions, caches, *, interpret: bool = False):
    """One decode step: tokens, positions [B, 1] -> fp32 logits [B, V] and the updated layer
    caches (`init_layer_caches` layout). weights: from `layer_weights`. interpret: run the
    kernels in Pallas interpret mode (CPU tests)."""
    cfg = model.cfg
    b = tokens.shape[0]
    n, kv, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def project(x, weight, **options):
        weight_rows, scale = weight
        return matvec(x, weight_rows, w_scale=scale, eps=cfg.norm_eps, interpret=interpret, **options)

    x = model.embed_tokens(tokens, positions)[:, 0]  # [B, D]
    cos, sin = (t.reshape(b, h // 2) for t in rope_tables(positions, h, cfg.rope_theta))
    rope = (cos, sin, n + kv)  # q and k heads turned, v passed through
    # Arrival counts of the attention splits: the last split of a kv head merges them in the
    # kernel and resets its count, so one zeroed buffer serves every layer of the step.
    split_counts = jnp.zeros((b, kv), jnp.int32)
    updated = []
    for w, cache in zip(weights["layers"], caches):
        layer_cache = jax.tree.map(lambda c: c[0], cache)  # drop the leading layer axis (of 1)
        qkv = dict(norm_weight=w["attn_norm"], rope=rope, head_groups=(n, kv, kv))
        if kv_cache.decode_kernel_reads(layer_cache, x.dtype):  # k and v go from the kernel into the cache
            q, cache_k, cache_v = project(x, w["qkv"], caches=(layer_cache["k"], layer_cache["v"]),
                                          cache_slot=positions[0, 0], **qkv)
            layer_cache = {"k": cache_k, "v": cache_v}
            out, split_counts = kv_cache.decode_over_pages(q.reshape(b, 1, n, h), cache_k, cache_v, positions,
                                                           interpret=interpret, split_counts=split_counts)
        else:
            q, k, v = project(x, w["qkv"], **qkv)
            out, layer_cache = kv_cache.attend_cached(q.reshape(b, 1, n, h), k.reshape(b, 1, kv, h),
                                                      v.reshape(b, 1, kv, h), positions, layer_cache)
        updated.append(jax.tree.map(lambda c: c[None], layer_cache))
        x = project(out.reshape(b, n * h), w["o"], residual=x)
        hidden = project(x, w["gate_up"], norm_weight=w["mlp_norm"], gated=True)
        x = project(hidden, w["down"], residual=x)
    return project(x, weights["head"], norm_weight=weights["final_norm"], out_dtype=jnp.float32), updated
