"""Hugging Face interop: import and export GPT-2 and Llama-family checkpoints exactly."""
from llmjax.convert.hf import load_hf, load_hf_model, save_hf
from llmjax.convert.hf_config import SUPPORTED_MODEL_TYPES, ConversionError, config_from_hf, config_to_hf
from llmjax.convert.safetensors_io import read_header, write_safetensors

__all__ = ["SUPPORTED_MODEL_TYPES", "ConversionError", "config_from_hf", "config_to_hf", "load_hf",
           "load_hf_model", "read_header", "save_hf", "write_safetensors"]
