"""Decode-step matrix-vector products with RMSNorm, SwiGLU, residual and int8 fused (Pallas); see api."""
from pallas_kernels.matvec.api import matvec
from pallas_kernels.matvec.config import MatvecBlocks

__all__ = ["matvec", "MatvecBlocks"]
