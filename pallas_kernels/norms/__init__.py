"""RMSNorm and LayerNorm, optionally fused with the residual add (Pallas kernels + reference)."""
from pallas_kernels.norms.api import layer_norm, layer_norm_residual, rms_norm, rms_norm_residual
from pallas_kernels.norms.config import NormConfig

__all__ = ["rms_norm", "layer_norm", "rms_norm_residual", "layer_norm_residual", "NormConfig"]
