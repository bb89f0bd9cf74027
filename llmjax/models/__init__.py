"""Models: the decoder-only Transformer (GPT-2 and Llama families) and how to build it."""
from llmjax.models.build import count_params, init_model, split_model
from llmjax.models.transformer import Transformer, init_cache

__all__ = ["Transformer", "count_params", "init_cache", "init_model", "split_model"]
