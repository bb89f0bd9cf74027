"""Cross-entropy over the vocabulary projection without materializing the logits (token chunks;
each chunk's softmax and logit gradient in one Pallas kernel on a GPU)."""
from pallas_kernels.cross_entropy.api import cross_entropy

__all__ = ["cross_entropy"]
