"""Reproductions of classic LLM-systems results, one module per claim: `python -m
experiments.reproduce <claim>` (see README.md in this folder)."""

CLAIMS = ("flash_memory", "zero_memory", "pipeline_bubble", "mfu", "paged_kv", "speculative",
          "scaling_small")
