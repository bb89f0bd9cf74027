"""Matmul tutorial kernels: Pallas Triton, Pallas Mosaic GPU, Triton through jax_triton; bf16 and fp8."""
from pallas_kernels.matmul.api import matmul, scaled_matmul

__all__ = ["matmul", "scaled_matmul"]
