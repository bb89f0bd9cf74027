"""Decoding: sampling, KV-cache generation, a continuous-batching engine over a paged cache, speculative decoding, int8 weight-only quantization."""
from llmjax.decode.engine import Engine, EngineConfig, RequestError
from llmjax.decode.generate import DecodeModel, generate, prepare_decode
from llmjax.decode.sampling import filter_logits, sample_logits
from llmjax.decode.speculative import speculative_generate

__all__ = ["DecodeModel", "Engine", "EngineConfig", "RequestError", "filter_logits", "generate",
           "prepare_decode", "sample_logits", "speculative_generate"]
