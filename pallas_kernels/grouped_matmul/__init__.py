"""Grouped (ragged) matmul for mixture-of-experts layers: Pallas kernels (Triton, and Mosaic GPU
on Hopper) over a padded group layout (MegaBlocks), forward and both gradients."""
from pallas_kernels.grouped_matmul.api import (GroupLayout, auto_backend, grouped_matmul, layout_from_sizes,
                                               make_layout, pad_rows, padded_grouped_matmul,
                                               unpad_rows)

__all__ = ["grouped_matmul", "padded_grouped_matmul", "make_layout", "layout_from_sizes",
           "pad_rows", "unpad_rows", "GroupLayout", "auto_backend"]
