"""Phase chains of a Llama decode step, for the tests and the benchmark."""
from pallas_kernels.decode_step.mosaic_step import Phase


def llama_without_attention(layers: int, d: int, heads_dim: int, qkv: int, mlp: int, vocab: int):
    """The weight reads of a Llama step with attention replaced by q itself (the attention output
    has q's shape): per layer q|k|v [qkv, d], o [d, heads_dim], gate|up [2 mlp, d], down [d, mlp],
    then the head [vocab, d]. Returns (weight shapes, phases, vector sizes); norms are rows
    2l (attention), 2l + 1 (MLP) and 2 layers (final)."""
    shapes, phases, sizes, h = [], [], {}, "h0"
    for layer in range(layers):
        w = len(shapes)
        shapes += [(qkv, d), (d, heads_dim), (2 * mlp, d), (d, mlp)]
        names = {part: f"{part}{layer}" for part in ("qkv", "mid", "gate_up", "out")}
        sizes.update({names["qkv"]: qkv, names["mid"]: d, names["gate_up"]: 2 * mlp, names["out"]: d})
        phases += [Phase(w, "norm", h, names["qkv"], norm=2 * layer),
                   Phase(w + 1, "copy", names["qkv"], names["mid"], residual=h),
                   Phase(w + 2, "norm", names["mid"], names["gate_up"], norm=2 * layer + 1),
                   Phase(w + 3, "swiglu", names["gate_up"], names["out"], residual=names["mid"])]
        h = names["out"]
    shapes.append((vocab, d))
    sizes["logits"] = vocab
    phases.append(Phase(len(shapes) - 1, "norm", h, "logits", norm=2 * layers))
    return shapes, phases, sizes
