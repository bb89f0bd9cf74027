"""Supervised fine-tuning: `python -m experiments.sft --config experiments/configs/sft.yaml [key=value ...]`.

Writes runs/<name>/config.yaml and metrics.jsonl; prints one line per eval.
"""
import sys

from experiments.posttrain import main_for
from llmjax.posttrain.sft import run_sft


def _summary(result):
    cfg, val_loss, _ = result
    return f"done: {cfg.steps} steps, val response NLL {val_loss:.4f} nats/token"


if __name__ == "__main__":
    sys.exit(main_for("sft", run_sft, _summary))
