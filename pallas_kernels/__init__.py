"""Pallas GPU kernels, one folder per op. Imports nothing from llmjax."""
