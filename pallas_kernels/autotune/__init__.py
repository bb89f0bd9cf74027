"""Kernel autotuner: search a kernel's configs on the device, keep winners in table.json.

Kernels call `best_config(kernel, key, default)`; `python -m pallas_kernels.autotune <op>` tunes
the benchmark shapes of an op and rewrites its entries (see __main__.py).
"""
from pallas_kernels.autotune.table import (best_config, device_key, flash_attention_key, matmul_key,
                                           norms_key)

__all__ = ["best_config", "device_key", "flash_attention_key", "matmul_key", "norms_key"]
