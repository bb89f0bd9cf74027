"""Benchmark cases: the five weight reads of a Llama 1.1B decode step (D 2048, 32 query and 4
kv heads of 64, F 5632, V 32000), bf16 and int8, with the neighbours the decode step fuses."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class MatvecCase:
    name: str
    k: int  # input width
    n: int  # outputs
    norm: bool = False
    gated: bool = False
    residual: bool = False
    int8: bool = False
    logits: bool = False  # fp32 output


_LLAMA_1B = [
    MatvecCase("qkv_norm", 2048, 2560, norm=True),
    MatvecCase("o_residual", 2048, 2048, residual=True),
    MatvecCase("gate_up_norm", 2048, 5632, norm=True, gated=True),
    MatvecCase("down_residual", 5632, 2048, residual=True),
    MatvecCase("head_norm_fp32", 2048, 32000, norm=True, logits=True),
]
BENCH_CASES = _LLAMA_1B + [dataclasses.replace(c, name=f"{c.name}_int8", int8=True) for c in _LLAMA_1B]
