"""Paged decode attention (one query token per sequence, block tables) in Pallas; see api."""
from pallas_kernels.decode_attention.api import kernel_gap, paged_decode_attention

__all__ = ["kernel_gap", "paged_decode_attention"]
