"""Flash attention (FlashAttention-2 forward and backward) in Pallas; see api.flash_attention."""
from pallas_kernels.flash_attention.api import flash_attention

__all__ = ["flash_attention"]
