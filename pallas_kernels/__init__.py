"""Pallas GPU kernels, one folder per op. Imports nothing from llmjax.

The public functions live at the top: `pallas_kernels.flash_attention(q, k, v, causal=True)`,
`pallas_kernels.rms_norm(x, w)`, ... Where a function shares its folder's name (flash_attention,
softmax, cross_entropy, matmul, grouped_matmul) the package attribute is the function, so reach
an op's modules with `from pallas_kernels.<op> import <module>`, not `import pallas_kernels.<op> as`.
"""
from pallas_kernels.cross_entropy import cross_entropy
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.matmul import matmul, scaled_matmul
from pallas_kernels.norms import layer_norm, layer_norm_residual, rms_norm, rms_norm_residual
from pallas_kernels.softmax import softmax

__all__ = ["cross_entropy", "flash_attention", "grouped_matmul", "layer_norm", "layer_norm_residual",
           "matmul", "paged_decode_attention", "rms_norm", "rms_norm_residual", "scaled_matmul", "softmax"]
