"""RLHF: `python -m experiments.rlhf --config experiments/configs/rlhf.yaml [key=value ...]`.

Trains a reward model on generated preference pairs (reward=model), then runs GRPO with
rollouts from the jitted decode path; reward=target_token is the toy reward. Writes
runs/<name>/config.yaml and metrics.jsonl; prints one line per logged iteration with the
rollout vs train time split.
"""
import sys

from experiments.posttrain import main_for
from llmjax.posttrain.rlhf import run_rlhf


def _summary(result):
    cfg, records, _ = result
    first, last = records[0], records[-1]
    rollout = sum(r["rollout_s"] for r in records[1:]) / max(len(records) - 1, 1)
    train = sum(r["train_s"] for r in records[1:]) / max(len(records) - 1, 1)
    return (f"done: {cfg.steps} GRPO iterations, reward {first['reward']:.4f} -> {last['reward']:.4f}, "
            f"KL {last['kl']:.4f}; per iteration after the first: rollout {rollout:.3f} s, train {train:.3f} s")


if __name__ == "__main__":
    sys.exit(main_for("rlhf", run_rlhf, _summary))
