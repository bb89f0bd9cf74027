"""Where each llmjax parameter lives in a Hugging Face checkpoint, and how to move it there.

Tensors are only transposed, reshaped, split or concatenated, never computed on, so
llmjax -> HF -> llmjax gives back bit-identical parameters. HF layouts (torch shapes):
  GPT-2 (Conv1D stores [in, out]): `c_attn` [D, 3D] = q|k|v columns, `attn.c_proj` [D, D],
    `c_fc` [D, F], `mlp.c_proj` [F, D]; `lm_head` absent when tied.
  Llama (nn.Linear stores [out, in]): `q_proj` [N*H, D], `k_proj`/`v_proj` [K*H, D],
    `o_proj` [D, N*H], `gate_proj`/`up_proj` [F, D], `down_proj` [D, F]; `lm_head.weight`
    [V, D] unless tied.
Both put heads major and head_dim minor (index n*H + h), which is llmjax's [..., N, H];
Llama checkpoints already hold q/k in the rotate_half RoPE layout llmjax uses.
D d_model, N heads, K kv heads, H head dim, F mlp, V vocab, L layers.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.config import ModelConfig
from llmjax.models import init_model, split_model

# Base-model prefix of each family when saved from the *ForCausalLM class.
PREFIXES = {"gpt2": "transformer.", "llama": "model."}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more llmjax leaves (several for GPT-2's fused c_attn).

    hf: the name; `{p}` stands for the base-model prefix, `{i}` for the layer index.
    paths: llmjax paths; inside `blocks`, per layer (leading axis dropped) when `{i}` is in hf.
    in_dims: how many leading llmjax dims are the matmul input; None for a vector.
    linear: HF stores [out, in] (torch nn.Linear) rather than [in, out] (Conv1D, embeddings).
    """

    hf: str
    paths: tuple[tuple[str, ...], ...]
    in_dims: int | None = 1
    linear: bool = False

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_shape(self, shapes) -> tuple[int, ...]:
        """Shape of the HF tensor, given the llmjax shapes of its parts."""
        if self.in_dims is None:
            return (sum(math.prod(s) for s in shapes),)
        n_in = math.prod(shapes[0][:self.in_dims])
        n_out = sum(math.prod(s[self.in_dims:]) for s in shapes)
        return (n_out, n_in) if self.linear else (n_in, n_out)

    def to_hf(self, parts) -> np.ndarray:
        """llmjax arrays -> the HF tensor: view each as [in, out], join along out, transpose."""
        if self.in_dims is None:
            return np.concatenate([p.reshape(-1) for p in parts])
        mats = [p.reshape(math.prod(p.shape[:self.in_dims]), -1) for p in parts]  # [in, out_j]
        m = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=1)
        return m.T if self.linear else m

    def from_hf(self, tensor, shapes) -> list[np.ndarray]:
        """The HF tensor -> llmjax arrays of `shapes` (views: no copy, no arithmetic)."""
        m = tensor.T if self.linear else tensor  # [in, out], or [out] for a vector
        sizes = [math.prod(s if self.in_dims is None else s[self.in_dims:]) for s in shapes]
        pieces = np.split(m, np.cumsum(sizes)[:-1], axis=-1)
        return [piece.reshape(s) for piece, s in zip(pieces, shapes)]


def _gpt2_rules() -> list[TensorRule]:
    layer = "{p}h.{i}."
    rules = [TensorRule("{p}wte.weight", (("embed",),)), TensorRule("{p}wpe.weight", (("pos_embed",),))]
    for hf_norm, norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        rules += [TensorRule(f"{layer}{hf_norm}.weight", ((norm, "scale"),), None),
                  TensorRule(f"{layer}{hf_norm}.bias", ((norm, "bias"),), None)]
    return rules + [
        TensorRule(layer + "attn.c_attn.weight", (("attn", "wq"), ("attn", "wk"), ("attn", "wv"))),
        TensorRule(layer + "attn.c_attn.bias", (("attn", "bq"), ("attn", "bk"), ("attn", "bv")), None),
        TensorRule(layer + "attn.c_proj.weight", (("attn", "wo"),), in_dims=2),
        TensorRule(layer + "attn.c_proj.bias", (("attn", "bo"),), None),
        TensorRule(layer + "mlp.c_fc.weight", (("mlp", "w_in"),)),
        TensorRule(layer + "mlp.c_fc.bias", (("mlp", "b_in"),), None),
        TensorRule(layer + "mlp.c_proj.weight", (("mlp", "w_out"),)),
        TensorRule(layer + "mlp.c_proj.bias", (("mlp", "b_out"),), None),
        TensorRule("{p}ln_f.weight", (("final_norm", "scale"),), None),
        TensorRule("{p}ln_f.bias", (("final_norm", "bias"),), None),
    ]


def _llama_rules() -> list[TensorRule]:
    layer = "{p}layers.{i}."
    rules = [TensorRule("{p}embed_tokens.weight", (("embed",),)),
             TensorRule(layer + "input_layernorm.weight", (("attn_norm", "scale"),), None),
             TensorRule(layer + "post_attention_layernorm.weight", (("mlp_norm", "scale"),), None)]
    projections = (("self_attn.q_proj", ("attn", "wq"), 1), ("self_attn.k_proj", ("attn", "wk"), 1),
                   ("self_attn.v_proj", ("attn", "wv"), 1), ("self_attn.o_proj", ("attn", "wo"), 2),
                   ("mlp.gate_proj", ("mlp", "w_gate"), 1), ("mlp.up_proj", ("mlp", "w_in"), 1),
                   ("mlp.down_proj", ("mlp", "w_out"), 1))
    rules += [TensorRule(f"{layer}{proj}.weight", (path,), in_dims, linear=True)
              for proj, path, in_dims in projections]
    return rules + [TensorRule("{p}norm.weight", (("final_norm", "scale"),), None)]


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every tensor of cfg's family; `lm_head.weight` (outside the prefix) only when untied."""
    rules = _gpt2_rules() if cfg.family == "gpt2" else _llama_rules()
    if not cfg.tie_embeddings:
        rules.append(TensorRule("lm_head.weight", (("lm_head",),), linear=True))
    return rules


def get_leaf(tree, path):
    """tree[path[0]][path[1]]... of a nested dict."""
    for key in path:
        tree = tree[key]
    return tree


def flatten(tree, prefix=()):
    """(path, leaf) pairs of a nested dict."""
    if not isinstance(tree, dict):
        yield prefix, tree
        return
    for key, sub in tree.items():
        yield from flatten(sub, (*prefix, key))


def expected_params(cfg: ModelConfig) -> dict:
    """llmjax's parameter tree for `cfg` as ShapeDtypeStructs (nothing is allocated)."""
    return split_model(nnx.eval_shape(lambda: init_model(cfg)))[1]


def _part_shapes(expected, rule: TensorRule) -> list[tuple[int, ...]]:
    if rule.per_layer:
        return [get_leaf(expected["blocks"], p).shape[1:] for p in rule.paths]
    return [get_leaf(expected, p).shape for p in rule.paths]


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF name -> tensor (numpy views of `params`): non-layer tensors, then layer by layer."""
    prefix, rules = PREFIXES[cfg.family], tensor_rules(cfg)
    tensors = {r.hf.format(p=prefix): r.to_hf([get_leaf(params, p) for p in r.paths])
               for r in rules if not r.per_layer}
    for i in range(cfg.n_layers):
        for r in (r for r in rules if r.per_layer):
            tensors[r.hf.format(p=prefix, i=i)] = r.to_hf([get_leaf(params["blocks"], p)[i] for p in r.paths])
    return tensors


def params_from_hf(cfg: ModelConfig, fetch: Callable[[str, tuple[int, ...]], np.ndarray],
                   names) -> tuple[dict, set[str]]:
    """llmjax params (numpy, cfg.param_dtype) from HF tensors.

    Args:
      cfg: the model config.
      fetch: (HF name, expected shape) -> the tensor; raises when it is missing or wrong.
      names: every tensor name in the checkpoint (to find the base-model prefix).
    Returns:
      (params, the HF names used).
    """
    base = PREFIXES[cfg.family]
    prefix = base if any(n.startswith(base) for n in names) else ""  # GPT2Model/LlamaModel saves lack it
    expected, target = expected_params(cfg), jnp.dtype(cfg.param_dtype)
    params, used = {}, set()
    for rule in tensor_rules(cfg):
        shapes = _part_shapes(expected, rule)
        layers = range(cfg.n_layers) if rule.per_layer else [None]
        outs = [np.empty(((cfg.n_layers,) if rule.per_layer else ()) + s, target) for s in shapes]
        for i in layers:
            name = rule.hf.format(p=prefix, i=i)
            for out, part in zip(outs, rule.from_hf(fetch(name, rule.hf_shape(shapes)), shapes)):
                out[... if i is None else i] = part  # the one copy, and the dtype cast
            used.add(name)
        for path, out in zip(rule.paths, outs):
            *parents, last = ("blocks", *path) if rule.per_layer else path
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = out
    return params, used
