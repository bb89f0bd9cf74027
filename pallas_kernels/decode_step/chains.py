"""Phase chains of a Llama decode step, for the tests and the benchmark."""
from pallas_kernels.decode_step.mosaic_step import Phase, Vector


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
