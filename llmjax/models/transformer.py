"""Decoder-only transformer for the GPT-2 and Llama families (Flax NNX), dense or MoE.

GPT-2 (Radford et al. 2019): LayerNorm, GELU MLP, learned positions, biases, tied head.
Llama (Touvron et al. 2023): RMSNorm, SwiGLU MLP, rotary positions, grouped-query
attention, no biases. Layers are created once under `nnx.vmap` (a leading `layers`
axis) and applied with `lax.scan`, so depth does not grow compile time.

B batch, T length, S cache length, D d_model, N heads, K kv heads, H head dim, F mlp, V vocab.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import ops
from llmjax.models import kv_cache
from llmjax.models.moe import MoE, ffn, param
from llmjax.config import ModelConfig
from sharding.axes import (ACT_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, LENGTH, MLP,
                           VOCAB)
from sharding.placement import constrain

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Norm(nnx.Module):
    """LayerNorm (with bias) for gpt2, RMSNorm for llama; fp32 statistics."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.eps, self.impl = cfg.norm_eps, cfg.norm_impl
        self.scale = param(rngs, (cfg.d_model,), (EMBED,), pd, fill=1.0)
        self.bias = param(rngs, (cfg.d_model,), (EMBED,), pd) if cfg.family == "gpt2" else None

    def __call__(self, x):
        if self.bias is None:
            return ops.rms_norm(x, self.scale[...], eps=self.eps, impl=self.impl)
        return ops.layer_norm(x, self.scale[...], self.bias[...], eps=self.eps, impl=self.impl)

    def add(self, x, residual):
        """(norm(x + residual), x + residual), fused where norm_impl allows (`ops.add_norm`)."""
        bias = None if self.bias is None else self.bias[...]
        return ops.add_norm(x, residual, self.scale[...], bias, eps=self.eps, impl=self.impl)


def rope_tables(positions, head_dim: int, theta: float):
    """cos, sin of rotary angles: positions [B, T] -> two [B, T, 1, H/2] fp32 arrays."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def apply_rope(x, cos, sin):
    """Rotate [B, T, N, H] by the angles; halves layout (x1, x2) as in the HF Llama code."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with an optional KV cache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # GPT-2: scale residual projections by 1/sqrt(2L)
        self.wq = param(rngs, (d, n, h), (EMBED, HEADS, HEAD_DIM), pd, std)
        self.wk = param(rngs, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), pd, std)
        self.wv = param(rngs, (d, k, h), (EMBED, KV_HEADS, HEAD_DIM), pd, std)
        self.wo = param(rngs, (n, h, d), (HEADS, HEAD_DIM, EMBED), pd, out_std)
        if cfg.family == "gpt2":
            self.bq = param(rngs, (n, h), (HEADS, HEAD_DIM), pd)
            self.bk = param(rngs, (k, h), (KV_HEADS, HEAD_DIM), pd)
            self.bv = param(rngs, (k, h), (KV_HEADS, HEAD_DIM), pd)
            self.bo = param(rngs, (d,), (EMBED,), pd)
        else:
            self.bq = self.bk = self.bv = self.bo = None

    def project_qkv(self, x, fused: bool = True):
        """q [B, T, N, H], k, v [B, T, K, H] of x [B, T, D].

        fused: one matmul over wq, wk, wv side by side as [D, K, G + 2, H] (each kv head's G
        query heads, then its key and value), so training's backward runs one GEMM for dx and
        one bias-gradient reduction instead of three each; a sharded head axis stays sharded
        alike (kv head k's rows are together). Decoding passes False: inside the token loop the
        concatenation would copy the weights at every step (XLA does not hoist it out of the
        loop; H200, Llama 1.1B: 1.17 -> 2.86 ms/token), while XLA's dot merger already joins the
        three one-row dots into one GEMM there. Training passes model.fuse_projections (H200,
        GPT-2 124M: the same step time either way; 350M: fused 0.6% faster).
        """
        cfg, dt = self.cfg, x.dtype
        weights = [ops.weight(v, dt) for v in (self.wq, self.wk, self.wv)]
        biases = None if self.bq is None else [b[...].astype(dt) for b in (self.bq, self.bk, self.bv)]
        if not fused:
            q, k, v = (ops.dense(x, w) for w in weights)
            return (q, k, v) if biases is None else (q + biases[0], k + biases[1], v + biases[2])
        kv, h = cfg.n_kv_heads, cfg.head_dim
        grouped = lambda w: w.reshape(*w.shape[:-2], kv, -1, h)  # noqa: E731  [..., N|K, H] -> [..., K, G|1, H]
        side_by_side = lambda *ws: jnp.concatenate([grouped(w) for w in ws], axis=-2)  # noqa: E731
        qkv = ops.dense(x, jax.tree.map(side_by_side, *weights))  # [B, T, K, G + 2, H]; int8: part by part
        if biases is not None:
            qkv = qkv + side_by_side(*biases)
        # lax.split: its gradient is one concatenate, where slices' would be zero pads summed.
        q, k, v = jax.lax.split(qkv, [cfg.n_heads // kv, 1, 1], axis=-2)
        return q.reshape(*x.shape[:-1], cfg.n_heads, h), k.squeeze(-2), v.squeeze(-2)

    def __call__(self, x, positions, cache, mask=None, fused: bool = True):
        """fused: as in `project_qkv` (Block passes False when decoding)."""
        cfg, dt = self.cfg, x.dtype
        q, k, v = self.project_qkv(x, fused)
        if cfg.family == "llama":
            cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = ops.attention(q, k, v, causal=True, impl=cfg.attention_impl, mask=mask)
        else:
            out, cache = kv_cache.attend_cached(q, k, v, positions, cache)
        y = ops.dense(out, ops.weight(self.wo, dt), 2)  # [B, T, D]
        if self.bo is not None:
            y = y + self.bo[...].astype(dt)
        return y, cache


class FeedForward(nnx.Module):
    """GELU MLP (gpt2) or SwiGLU (llama)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_mlp
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5
        self.w_in = param(rngs, (d, f), (EMBED, MLP), pd, std)
        self.w_out = param(rngs, (f, d), (MLP, EMBED), pd, out_std)
        if cfg.family == "gpt2":
            self.b_in = param(rngs, (f,), (MLP,), pd)
            self.b_out = param(rngs, (d,), (EMBED,), pd)
            self.w_gate = None
        else:
            self.w_gate = param(rngs, (d, f), (EMBED, MLP), pd, std)
            self.b_in = self.b_out = None

    def __call__(self, x, fused: bool = True):
        """x [B, T, D] -> [B, T, D]. fused: SwiGLU's gate and up projections as one matmul
        (stacked [D, 2, F]); False when decoding, as `Attention.project_qkv`."""
        weights = {n: ops.weight(getattr(self, n), x.dtype) for n in ("w_in", "w_gate", "w_out", "b_in", "b_out")
                   if getattr(self, n) is not None}
        if fused and "w_gate" in weights:
            weights["w_gate_in"] = jax.tree.map(lambda g, i: jnp.stack([g, i], axis=-2),
                                                weights.pop("w_gate"), weights.pop("w_in"))
        return ffn(x, weights, ops.dense, lambda b: b)  # [B, T, D] -> [B, T, F] -> [B, T, D]


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With model.n_experts > 0 the mlp is a `MoE`, plus, with model.n_shared_experts > 0, one
    always-on MLP of width n_shared_experts * d_mlp (the shared experts fused: the same sum).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.fuse_projections = cfg.fuse_projections
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MoE(cfg, rngs) if cfg.n_experts else FeedForward(cfg, rngs)
        self.shared_mlp = (FeedForward(dataclasses.replace(cfg, d_mlp=cfg.n_shared_experts * cfg.d_mlp), rngs)
                           if cfg.n_experts and cfg.n_shared_experts else None)

    def __call__(self, x, pending, positions, cache, mask=None):
        """(x, pending, cache) -> (x, pending, cache, aux). The block's input is x + pending and
        its output is the returned x + pending: each residual add is left to the norm after it,
        which does it in the same pass (`Norm.add`); pending=None for nothing to add. aux is a
        dict of this block's auxiliary outputs (empty for the dense feed-forward; see
        `MoE.__call__`). `mask` as in hidden_states."""
        fused = cache is None and self.fuse_projections  # see Attention.project_qkv
        h, x = (self.attn_norm(x), x) if pending is None else self.attn_norm.add(x, pending)
        y, cache = self.attn(h, positions, cache, mask, fused)
        h, x = self.mlp_norm.add(x, y)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h)
            if self.shared_mlp is not None:
                y = y + self.shared_mlp(h, fused=fused)
        else:
            y, aux = self.mlp(h, fused=fused), {}
        x, y = (constrain(a, (BATCH, LENGTH, ACT_EMBED)) for a in (x, y))
        return x, y, cache, aux


class Transformer(nnx.Module):
    """The decoder-only language model.

    Build with `llmjax.models.init_model` (handles sharding contexts), or directly under
    `nnx.use_eager_sharding(False)` / a mesh + `nnx.logical_axis_rules` context.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), (VOCAB, EMBED), pd, std)
        self.pos_embed = (param(rngs, (cfg.max_seq_len, cfg.d_model), (None, EMBED), pd, std)
                          if cfg.family == "gpt2" else None)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (None if cfg.tie_embeddings
                        else param(rngs, (cfg.d_model, cfg.vocab_size), (EMBED, VOCAB), pd, std))

    def embed_tokens(self, tokens, positions):
        """Token (+ learned position) embeddings [B, T, D] in the compute dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        x = self.embed[...].astype(dt)[tokens]
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(dt)[positions]
        return constrain(x, (BATCH, LENGTH, ACT_EMBED))

    def apply_blocks(self, x, positions, cache=None, block_state=None, mask=None):
        """Run the stacked blocks over x [B, T, D]: (x, cache, aux). `mask` as in hidden_states.

        `block_state` defaults to all layers; a pipeline stage passes its slice of
        `nnx.split(model.blocks)[1]` (leading axis = its layers). aux holds each block's
        auxiliary outputs stacked on a leading layer axis.
        """
        block_def, all_state = nnx.split(self.blocks)
        block_state = all_state if block_state is None else block_state

        # A plain lax.scan over the stacked block state: works under any outer transform
        # (jit, fori_loop, grad), where nnx.scan rejects modules from another trace level.
        # The carry is (x, pending): the stream is x + pending, and each block leaves its last
        # residual add to the next block's first norm (Block.__call__). The scan's carry needs a
        # fixed structure, so "nothing pending" is zeros there and None in the unrolled loop.
        def layer(carry, per_layer):
            state, layer_cache = per_layer
            x, pending, layer_cache, aux = nnx.merge(block_def, state)(*carry, positions, layer_cache, mask)
            return (x, pending), (layer_cache, aux)

        step = layer
        if self.cfg.remat != "none":
            checkpointed = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.cfg.remat])

            def step(carry, per_layer):  # the sum crosses the remat boundary: it saves one input, not two
                x, pending = carry
                return checkpointed((x if pending is None else x + pending, None), per_layer)

        if self.cfg.scan_layers or cache is not None:  # decoding keeps the scan: in-place cache updates
            (x, pending), (cache, aux) = jax.lax.scan(step, (x, jnp.zeros_like(x)), (block_state, cache))
            return x + pending, cache, aux
        # Unrolled: XLA keeps the saved activations as plain buffers instead of copying them into
        # stacked scan outputs. The stacked weights are cut with lax.split, whose gradient is one
        # concatenate; the gradient of `a[i]` is `a` padded with zeros, and the L pads are summed:
        # L adds of the whole stacked array per weight (an H200, Llama 1.1B B16: 46 ms of a
        # 459 ms step).
        leaves, treedef = jax.tree.flatten(block_state)
        n_layers = leaves[0].shape[0]
        pieces = [jax.lax.split(a, [1] * n_layers) for a in leaves]
        outs, carry = [], (x, None)
        for i in range(n_layers):
            state = treedef.unflatten([p[i].reshape(p[i].shape[1:]) for p in pieces])
            carry, out = step(carry, (state, None))
            outs.append(out)
        _, aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return carry[0] + carry[1], None, aux

    def hidden_states(self, tokens, positions=None, cache=None, mask=None):
        """Final-norm hidden states [B, T, D] and the updated cache.

        Args:
          tokens: [B, T] int32.
          positions: [B, T] int32 absolute positions; default 0..T-1.
          cache: None, or a cache from `init_cache` ({"k", "v"}: [L, B, S, K, H]).
          mask: optional bool [B, T, T] for un-cached calls (True = may attend), combined with
            the causal mask, e.g. block-diagonal for packed examples; takes the xla attention.
        Raises:
          ValueError: T (or the cache length) exceeds model.max_seq_len, or a mask with a cache.
        """
        hidden, cache, _ = self._hidden_and_aux(tokens, positions, cache, mask)
        return hidden, cache

    def _hidden_and_aux(self, tokens, positions=None, cache=None, mask=None):
        cfg = self.cfg
        b, t = tokens.shape
        length = t if cache is None else kv_cache.cache_length(cache)
        if t > cfg.max_seq_len or length > cfg.max_seq_len:
            raise ValueError(f"sequence length {max(t, length)} exceeds model.max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if mask is not None and cache is not None:
            raise ValueError("mask applies to un-cached calls; a cache masks by position")
        x, cache, aux = self.apply_blocks(self.embed_tokens(tokens, positions), positions, cache, mask=mask)
        return self.final_norm(x), cache, aux

    def head_weight(self):
        """The output projection as [V, D]: the embedding when tied."""
        return self.embed[...] if self.lm_head is None else self.lm_head[...].T

    def logits(self, hidden):
        """[B, T, D] -> [B, T, V] fp32 logits."""
        dt = hidden.dtype
        w = ops.weight(self.embed, dt).T if self.lm_head is None else ops.weight(self.lm_head, dt)
        return ops.dense(hidden, w, out_dtype=jnp.float32)

    def loss(self, tokens):
        """Mean next-token cross-entropy on tokens [B, T + 1], without the auxiliary losses:
        what evaluation reports. The training objective is `loss_and_metrics`."""
        hidden, _, _ = self._hidden_and_aux(tokens[:, :-1])
        return self.head_loss(hidden, tokens[:, 1:])

    def loss_and_metrics(self, tokens):
        """(loss, metrics) on tokens [B, T + 1]: mean next-token cross-entropy
        (model.loss_impl picks how) plus any auxiliary losses; metrics is a dict of
        scalars or small arrays to log (empty for a dense model, see `aux_metrics`)."""
        hidden, _, aux = self._hidden_and_aux(tokens[:, :-1])
        return self.head_loss(hidden, tokens[:, 1:]) + self.aux_loss(aux), self.aux_metrics(aux)

    def head_loss(self, hidden, targets):
        """Mean cross-entropy of the next-token head on final-norm hidden [B, T, D]."""
        return ops.lm_loss(hidden, self.head_weight(), targets, impl=self.cfg.loss_impl)

    def aux_loss(self, aux):
        """The weighted sum of the blocks' auxiliary losses (0 for a dense model): each MoE
        layer adds moe_aux_loss_weight * its load-balancing loss + moe_z_loss_weight * its
        router z-loss (summed over layers, as in Switch and ST-MoE). aux: from `apply_blocks`."""
        if not aux:
            return 0.0
        cfg = self.cfg
        return cfg.moe_aux_loss_weight * aux["aux_loss"].sum() + cfg.moe_z_loss_weight * aux["z_loss"].sum()

    def aux_metrics(self, aux):
        """Metrics of the blocks' aux outputs (from `apply_blocks`, a leading layer axis):
        moe_aux_loss and moe_z_loss (unweighted, mean over layers; 1.0 is balanced),
        expert_load [E] (fraction of assignments per expert, mean over layers),
        expert_load_layers [L, E], and moe_dropped (capacity drops, with a capacity factor)."""
        if not aux:
            return {}
        metrics = {"moe_aux_loss": aux["aux_loss"].mean(), "moe_z_loss": aux["z_loss"].mean(),
                   "expert_load": aux["load"].mean(0), "expert_load_layers": aux["load"]}
        if "dropped" in aux:
            metrics["moe_dropped"] = aux["dropped"].mean()
        return metrics

    def __call__(self, tokens, positions=None, cache=None):
        """Logits [B, T, V] fp32 and the updated cache (None when no cache was given)."""
        hidden, cache = self.hidden_states(tokens, positions, cache)
        return self.logits(hidden), cache


init_cache = kv_cache.init_cache
