"""DPO: `python -m experiments.dpo --config experiments/configs/dpo.yaml [key=value ...]`.

Writes runs/<name>/config.yaml and metrics.jsonl; prints one line per eval.
"""
import sys

from experiments.posttrain import main_for
from llmjax.posttrain.dpo import run_dpo


def _summary(result):
    cfg, val, _ = result
    return (f"done: {cfg.steps} steps, held-out preference accuracy {val['accuracy']:.3f}, "
            f"reward margin {val['reward_margin']:.4f}")


if __name__ == "__main__":
    sys.exit(main_for("dpo", run_dpo, _summary))
