"""Decoding: sampling, KV-cache generation, speculative decoding, int8 weight-only quantization."""
from llmjax.decode.generate import DecodeModel, generate, prepare_decode
from llmjax.decode.sampling import filter_logits, sample_logits
from llmjax.decode.speculative import speculative_generate

__all__ = ["DecodeModel", "filter_logits", "generate", "prepare_decode", "sample_logits",
           "speculative_generate"]
