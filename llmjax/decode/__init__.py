"""Decoding: sampling and KV-cache generation."""
from llmjax.decode.generate import generate
from llmjax.decode.sampling import sample_logits

__all__ = ["generate", "sample_logits"]
