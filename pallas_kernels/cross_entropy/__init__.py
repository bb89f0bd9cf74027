"""Cross-entropy over the vocabulary projection without materializing the logits (chunked, plain JAX)."""
from pallas_kernels.cross_entropy.api import cross_entropy

__all__ = ["cross_entropy"]
