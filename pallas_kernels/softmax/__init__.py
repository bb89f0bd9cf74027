"""Row softmax, safe for -inf and all -inf rows (Pallas kernels + reference)."""
from pallas_kernels.softmax.api import softmax
from pallas_kernels.softmax.config import SoftmaxConfig

__all__ = ["softmax", "SoftmaxConfig"]
