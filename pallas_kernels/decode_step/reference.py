"""What run_phases computes, in plain jnp."""
import math

import jax
import jax.numpy as jnp

from pallas_kernels.decode_step import attention as attn
from pallas_kernels.decode_step.mosaic_step import _named
from pallas_kernels.matvec.reference import rotated


def rope(pos: int, theta: float = 10000.0):
    """fp32 [2, 32]: cos and sin of a position's rotary angles (the kernel's `rope` input)."""
    angles = pos * theta ** (-jnp.arange(0, attn.HEAD_DIM, 2, dtype=jnp.float32) / attn.HEAD_DIM)
    return jnp.stack([jnp.cos(angles), jnp.sin(angles)])


def attention(qkv, k_cache, v_cache, pos: int, splits: int = 1):
    """(attention output, new_kv [2 K 64]) of one layer, q and the new k already rotated:
    softmax over cache positions [0, pos) and the new token, GQA (q head h reads kv head h // G,
    G = Q / K; the cache [T, K, 64] names K, qkv [(Q + 2 K) 64] then Q). The output is [Q 64],
    or with splits > 1 the splits' partials [2 splits * Q 64] (attention_unit)."""
    hd, kv = attn.HEAD_DIM, k_cache.shape[1]
    q_len = qkv.shape[0] - 2 * kv * hd
    q_heads = q_len // hd
    q_k = qkv[:q_len + kv * hd]
    q, k_new = q_k[:q_len].reshape(q_heads, hd), q_k[q_len:].reshape(kv, hd)
    v_new = qkv[q_len + kv * hd:].reshape(kv, hd)
    keys = jnp.concatenate([k_cache[:pos].astype(jnp.float32), k_new[None]])  # [pos + 1, kv, hd]
    values = jnp.concatenate([v_cache[:pos].astype(jnp.float32), v_new[None]])
    keys, values = (jnp.repeat(a, q_heads // kv, axis=1) for a in (keys, values))
    scores = jnp.einsum("hd,thd->ht", q, keys, precision="highest") / hd ** 0.5  # [heads, pos + 1]
    new_kv = jnp.stack([k_new, v_new], axis=1).reshape(-1)
    if splits == 1:
        out = jnp.einsum("ht,thd->hd", jax.nn.softmax(scores, axis=-1), values, precision="highest")
        return out.reshape(-1), new_kv
    n_chunks = -(-pos // attn.BLOCK)
    outs, lses = [], []
    for split in range(splits):  # the last split takes the new token (the last key) too
        first, end = (int(i) for i in attn.chunk_range(n_chunks, split, splits))
        taken = [t for t in range(first * attn.BLOCK, min(pos, max(end, first) * attn.BLOCK))] + [pos] * (
            split == splits - 1)
        s = scores[:, taken] * math.log2(math.e)
        top = s.max(axis=1, initial=-jnp.inf, keepdims=True)
        p = jnp.exp2(s - jnp.where(jnp.isfinite(top), top, 0.0))
        total = p.sum(axis=1, keepdims=True)
        o = jnp.einsum("ht,thd->hd", p, values[jnp.asarray(taken, jnp.int32)], precision="highest")
        outs.append(jnp.where(total > 0, o / jnp.where(total > 0, total, 1.0), 0.0).reshape(-1))
        lses.append(jnp.broadcast_to(top + jnp.log2(total), (q_heads, hd)).reshape(-1))
    return jnp.concatenate(outs + lses), new_kv


def run_phases(weights, norms, inputs, layer_phases, final_phases, vectors, *, layers: int, cache=None,
               eps: float = 1e-5):
    acts = {name: jnp.zeros((v.rows, v.n), jnp.float32) for name, v in vectors.items()}
    for name, value in inputs.items():
        acts[name] = acts[name].at[0].set(value.astype(jnp.float32))

    def row(ref, layer):
        name, delta = _named(ref)
        return name, (layer + delta - vectors[name].first if vectors[name].rows > 1 else 0)

    def run(phase, layer, in_loop):
        if phase.attention is not None:
            k_cache, v_cache, pos, _ = cache
            spec = phase.attention
            name, r = row(spec.qkv, layer)
            out, new_kv = attention(acts[name][r], k_cache[layer], v_cache[layer], int(pos[0]), spec.splits)
            for vec, value in ((spec.out, out), (spec.new_kv, new_kv)):
                name, r = row(vec, layer)
                acts[name] = acts[name].at[r].set(value)
        w = weights[phase.weight][layer] if in_loop else weights[phase.weight]
        n, k = w.shape
        name, r = row(phase.source, layer)
        v = acts[name][r]
        if phase.x == "norm":
            scale = norms[phase.norm][layer if in_loop else 0]
            v = v[:k] * jax.lax.rsqrt(jnp.mean(v[:k] * v[:k]) + eps) * scale
        elif phase.x == "swiglu":
            v = jax.nn.silu(v[:k]) * v[k:2 * k]
        elif phase.x == "merge":
            outs, lses = jnp.split(v.reshape(-1, k), 2)
            shares = jnp.exp2(lses - lses.max(axis=0))
            v = (outs * shares).sum(axis=0) / shares.sum(axis=0)
        y = jnp.matmul(w.astype(jnp.float32), v[:k].astype(jnp.bfloat16).astype(jnp.float32), precision="highest")
        if phase.rope:
            cos, sin = cache[3]
            y = rotated(y[None], cos[None], sin[None], phase.rope // attn.HEAD_DIM)[0]
        if phase.residual is not None:
            name, r = row(phase.residual, layer)
            y = y + acts[name][r, :n]
        name, r = row(phase.out, layer)
        acts[name] = acts[name].at[r, :n].add(y)

    for layer in range(layers):
        for phase in layer_phases:
            run(phase, layer, True)
    for phase in final_phases:
        run(phase, layers, False)
    return acts
