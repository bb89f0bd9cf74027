"""Phase chains of a Llama decode step, for the tests and the benchmark."""
import dataclasses

from pallas_kernels.decode_step import attention as attn
from pallas_kernels.decode_step.mosaic_step import Attention, Phase, Vector


def llama_without_attention(layers: int, d: int, heads_dim: int, qkv: int, mlp: int, vocab: int):
    """The weight reads of a Llama step, attention replaced by q itself (the attention output has
    q's shape). Weights: q|k|v [layers, qkv, d], o [layers, d, heads_dim], gate|up
    [layers, 2 mlp, d], down [layers, d, mlp], head [vocab, d]; norms: attention and MLP
    [layers, d], final [1, d]. Returns (weight shapes, norm shapes, layer phases, final phases,
    vectors); the input is vector "h" (row l is layer l's input, row `layers` the head's)."""
    shapes = [(layers, qkv, d), (layers, d, heads_dim), (layers, 2 * mlp, d), (layers, d, mlp), (vocab, d)]
    norm_shapes = [(layers, d), (layers, d), (1, d)]
    layer_phases = [Phase(0, "norm", "h", "qkv", norm=0),
                    Phase(1, "copy", "qkv", "mid", residual="h"),
                    Phase(2, "norm", "mid", "gate_up", norm=1),
                    Phase(3, "swiglu", "gate_up", ("h", 1), residual="mid")]
    final_phases = [Phase(4, "norm", "h", "logits", norm=2)]
    vectors = dict(h=Vector(d, layers + 1), qkv=Vector(qkv, layers), mid=Vector(d, layers),
                   gate_up=Vector(2 * mlp, layers), logits=Vector(vocab))
    return shapes, norm_shapes, layer_phases, final_phases, vectors


def llama(layers: int, d: int, mlp: int, vocab: int, attention_splits: int = 1, q_heads: int = 32,
          kv_heads: int = 4):
    """A Llama step with q_heads over kv_heads of 64 dims (Llama 1.1B's 32 over 4 by default), as
    llama_without_attention but o reads the attention output, computed over the cache at the
    start of the o phase (on kv_heads attention_splits CTAs, the o phase merging the splits), q
    and k rotated by the q|k|v phase. Also writes vector "new_kv" (per layer the new token's
    rotated k and its v, head g's at 128 g) for the caller to store into the cache."""
    hd = attn.HEAD_DIM
    shapes, norm_shapes, layer_phases, final_phases, vectors = llama_without_attention(
        layers, d, q_heads * hd, (q_heads + 2 * kv_heads) * hd, mlp, vocab)
    attention = Attention("qkv", "attn", "new_kv", attention_splits)
    layer_phases[0] = dataclasses.replace(layer_phases[0], rope=(q_heads + kv_heads) * hd)
    merged = attention_splits > 1
    layer_phases[1] = Phase(1, "merge" if merged else "copy", "attn", "mid", residual="h", attention=attention)
    # attn is stored, not added, and read only by its layer's o phase: one row serves every layer,
    # which keeps the workspace run_phases zeroes each step small (a row a layer was 2.9 MB of 4.6).
    vectors.update(attn=Vector(q_heads * hd * (2 * attention_splits if merged else 1)),
                   new_kv=Vector(2 * kv_heads * hd, layers))
    return shapes, norm_shapes, layer_phases, final_phases, vectors
