"""Train a model: `python -m experiments.train --config experiments/configs/<x>.yaml [key=value ...]`.

Writes runs/<name>/ (config.yaml, metrics.jsonl, tb/, checkpoints/, samples.txt).
"""
import argparse
import sys

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError, load_config
from llmjax.train.loop import TrainingDiverged, train


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train", description=__doc__.splitlines()[0],
        epilog="Overrides are dotted keys, e.g. model.n_layers=4 train.steps=200 preset=gpt2-tiny.")
    parser.add_argument("--config", help="YAML experiment file (experiments/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name> from its newest checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (eval lines still print)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    except (ConfigError, CheckpointError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.val_loss is not None:
        print(f"done: step {result.step}, val loss {result.val_loss:.4f} nats/token "
              f"(unigram entropy of the corpus: {result.unigram_entropy:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
