"""int8 weight-only quantization of the matmul weights, and perplexity to measure its cost.

Each matmul weight becomes int8 values with one scale per output channel (absmax / 127 over
the contracted axes). The quantized tree replaces the float params given to `nnx.merge`; the
model's matmuls (`llmjax.ops.dense`) convert the int8 values inside the GEMM and multiply the
output by the scales, so a decode step reads 1 byte per weight instead of bf16's 2. Reading a
weight as `w[...]` (the loss's head, the embedding lookup) dequantizes it where it is used.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.ops import Int8Weight

# Matmul weights by parameter name -> (rank, axes contracted with the input), not counting a
# leading `layers` axis. The scales run over the other (output) axes.
MATMUL_WEIGHTS = {
    "wq": (3, (0,)), "wk": (3, (0,)), "wv": (3, (0,)),  # [D, N|K, H]
    "wo": (3, (0, 1)),  # [N, H, D]
    "w_in": (2, (0,)), "w_gate": (2, (0,)), "w_out": (2, (0,)),  # [D, F], [F, D]
    "lm_head": (2, (0,)),  # [D, V]
}
TIED_EMBED = (2, (1,))  # embed [V, D] is the output head when embeddings are tied


def quantize(w, contracted_axes, dtype) -> Int8Weight:
    """Symmetric absmax int8 with one scale per output channel (the axes not contracted)."""
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=contracted_axes, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(values, scale.astype(dtype))


def quantize_params(params: nnx.State, dtype, tie_embeddings: bool) -> nnx.State:
    """The state with every matmul weight (MATMUL_WEIGHTS; the embedding when it is the tied
    head) replaced by an Int8Weight whose scales are in `dtype`. Other leaves are unchanged;
    a weight of an unexpected rank (e.g. an expert-stacked one) stays float."""

    def convert(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        layout = TIED_EMBED if names == ["embed"] and tie_embeddings else MATMUL_WEIGHTS.get(names[-1])
        offset = 1 if names[0] == "blocks" else 0  # the stacked `layers` axis
        if layout is None or leaf.ndim != offset + layout[0]:
            return leaf
        return quantize(leaf, tuple(a + offset for a in layout[1]), dtype)

    return jax.tree_util.tree_map_with_path(convert, params)


def perplexity(model, windows, *, batch_size: int = 8, max_windows: int | None = None) -> float:
    """exp(mean next-token cross-entropy) of `model` (a Transformer or a
    `llmjax.decode.prepare_decode` result, e.g. int8) over token windows [n, T + 1].

    Raises:
      ValueError: no windows, or T longer than the model's max_seq_len.
    """
    from llmjax.decode.generate import prepare_decode

    model = prepare_decode(model)
    windows = np.asarray(windows)[:max_windows]
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"windows must be a non-empty [n, seq_len + 1] array, got shape {windows.shape}")
    if windows.shape[1] - 1 > model.cfg.max_seq_len:
        raise ValueError(f"window length {windows.shape[1] - 1} exceeds model.max_seq_len={model.cfg.max_seq_len}")

    @jax.jit
    def loss_sum(params, batch):
        return nnx.merge(model.graphdef, params).loss(batch) * batch.shape[0]

    total = 0.0
    for start in range(0, len(windows), batch_size):
        total += float(loss_sum(model.params, jnp.asarray(windows[start:start + batch_size])))
    return float(np.exp(total / len(windows)))
