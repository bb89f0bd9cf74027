"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the frozen
base stored as 4-bit NormalFloat (NF4), LoRA adapters trained on top.

Each matmul weight (and the embeddings) is cut into blocks of `block` values (per layer for
the stacked blocks); a block keeps its absmax as an fp32 scale and each value as the index
of the nearest of 16 NF4 levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0;
section 3 of the paper), two indices per uint8. Storage: 4 bits + 32 / block bits per value
(4.5 at block 64) against bf16's 16: 3.56x smaller. Round trip: each value is off by at most
half the widest gap between adjacent levels times its block's absmax (`max_error`).

The quantized weight is an `NF4Weight` leaf in the params tree; the model reads a weight as
`w[...]`, which dequantizes it (and adds the LoRA update when adapters are attached) right
where the layer uses it, inside the jitted step: one layer's weights at a time under the
layer scan, so no full-precision copy of the whole base is ever stored. Norms and biases
are kept in bf16 (a few KB).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from llmjax.config import LoraConfig
from llmjax.decode.quantize import MATMUL_WEIGHTS
from llmjax.lora import TARGETS


def _nf4_levels() -> np.ndarray:
    """The 16 NF4 levels: 8 positive and 7 negative normal quantiles plus 0, in [-1, 1]. The
    outermost quantile is taken at 1 - (1/32 + 1/30) / 2 (the paper's offset), not at 1."""
    offset = 1 - 0.5 * (1 / 32 + 1 / 30)
    positive = np.asarray(ndtri(np.linspace(0.5, offset, 9)[1:]))
    negative = -np.asarray(ndtri(np.linspace(0.5, offset, 8)[1:]))
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    return (levels / np.abs(levels).max()).astype(np.float32)


NF4_LEVELS = _nf4_levels()


def max_error(scale):
    """The round-trip bound of a block with absmax `scale`: half the widest level gap times it."""
    return scale * float(np.diff(NF4_LEVELS).max()) / 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NF4Weight:
    """A frozen weight in NF4, optionally with LoRA adapters: `w[...]` gives
    dequant(codes, scales) + lora_scale * A @ B in `dtype`.

    codes: [*lead, n_blocks, block // 2] uint8 (low nibble first); scales: [*lead, n_blocks]
    fp32; lead is the stacked layers axis (sliced away inside the layer scan) or nothing.
    a: [*lead, *in, r], b: [*lead, r, *out] (`llmjax.lora` layout) or None.
    """

    codes: jax.Array
    scales: jax.Array
    a: jax.Array | None = None
    b: jax.Array | None = None
    shape: tuple = dataclasses.field(default=(), metadata={"static": True})  # per-layer weight shape
    dtype: str = dataclasses.field(default="float32", metadata={"static": True})
    lora_scale: float = dataclasses.field(default=0.0, metadata={"static": True})

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise IndexError(f"NF4Weight supports only w[...], got index {index!r}")
        lead = self.codes.shape[:-2]
        nibbles = jnp.stack([self.codes & 15, self.codes >> 4], axis=-1).reshape(*lead, self.scales.shape[-1], -1)
        values = jnp.asarray(NF4_LEVELS)[nibbles] * self.scales[..., None]  # [*lead, n_blocks, block]
        size = int(np.prod(self.shape))
        w = values.reshape(*lead, -1)[..., :size].reshape(*lead, *self.shape)
        if self.a is not None:
            rank = self.a.shape[-1]
            a = self.a.reshape(*lead, -1, rank)
            b = self.b.reshape(*lead, rank, -1)
            w = w + (self.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)).reshape(w.shape)
        return w.astype(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.size + 4 * self.scales.size


def quantize_nf4(w, block: int = 64, lead: int = 0) -> NF4Weight:
    """NF4 blocks of `w`, separately for each index of its first `lead` axes (the layers).

    Raises:
      ValueError: block not even.
    """
    if block % 2:
        raise ValueError(f"qlora_block={block} must be even (two 4-bit codes per byte)")
    lead_shape, shape = w.shape[:lead], w.shape[lead:]
    flat = w.astype(jnp.float32).reshape(*lead_shape, -1)
    pad = -flat.shape[-1] % block
    blocks = jnp.pad(flat, [(0, 0)] * lead + [(0, pad)]).reshape(*lead_shape, -1, block)
    scales = jnp.max(jnp.abs(blocks), axis=-1)
    scales = jnp.where(scales == 0, 1.0, scales)
    normalized = blocks / scales[..., None]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normalized).astype(jnp.uint8)  # nearest level
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return NF4Weight(packed, scales, shape=tuple(shape), dtype=str(w.dtype))


def quantize_base(params: dict, block: int = 64) -> dict:
    """The params with every matmul weight (`decode.quantize.MATMUL_WEIGHTS`) and the
    embeddings (tokens, learned positions) as NF4Weight (dequantizing to the weight's
    dtype), the other floating leaves (norms, biases) in bf16. All matmul weights are
    quantized, LoRA targets or not."""

    def convert(path, leaf):
        names = [k.key for k in path]
        if names[-1] not in ("embed", "pos_embed") and names[-1] not in MATMUL_WEIGHTS:
            return leaf.astype(jnp.bfloat16) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
        return quantize_nf4(leaf, block, lead=1 if names[0] == "blocks" else 0)

    return jax.tree_util.tree_map_with_path(convert, params)


def attach(base: dict, adapters: dict, lora: LoraConfig) -> dict:
    """The quantized base with each LoRA target's adapters placed inside its NF4Weight
    (pure; used inside the jitted step, so gradients reach the adapters).

    Raises:
      ValueError: adapters lack a target named in lora.targets.
    """
    out = jax.tree.map(lambda x: x, base, is_leaf=lambda x: isinstance(x, NF4Weight))
    for name in lora.target_names:
        path = TARGETS[name][0]
        node, ab = out, adapters
        for key in path[:-1]:
            node, ab = node[key], ab.get(key, {})
        if path[-1] not in ab:
            raise ValueError(f"adapters lack {'.'.join(path)}, which lora.targets={lora.targets!r} names")
        node[path[-1]] = dataclasses.replace(node[path[-1]], a=ab[path[-1]]["a"], b=ab[path[-1]]["b"],
                                             lora_scale=lora.alpha / lora.rank)
    return out


def dequantize_base(base: dict) -> dict:
    """Plain params from a quantized base (NF4Weight leaves dequantized, adapters added)."""
    return jax.tree.map(lambda x: x[...] if isinstance(x, NF4Weight) else x, base,
                        is_leaf=lambda x: isinstance(x, NF4Weight))


def memory_report(params: dict, base: dict) -> dict:
    """Bytes of the frozen base: NF4 (codes + scales + unquantized leaves) against the same
    params in bf16 (what bf16 LoRA keeps), and their ratio."""
    is_q = lambda x: isinstance(x, NF4Weight)
    q_bytes = sum(x.nbytes if is_q(x) else x.size * x.dtype.itemsize
                  for x in jax.tree.leaves(base, is_leaf=is_q))
    bf16 = sum(2 * x.size for x in jax.tree.leaves(params))
    return {"base_bytes_nf4": int(q_bytes), "base_bytes_bf16": int(bf16), "base_bf16_over_nf4": bf16 / q_bytes}
