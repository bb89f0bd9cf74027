"""Kernels written in Triton itself, called through jax_triton.triton_call (optional extra `triton`)."""
from pallas_kernels.triton.add_rms_norm import rms_norm_residual, unavailable_reason

__all__ = ["rms_norm_residual", "unavailable_reason"]
