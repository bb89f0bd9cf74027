"""Shared command line of the post-training entry points (experiments.sft, .dpo, .rlhf):
`--config FILE [key=value ...]`, errors as one line and exit status 2."""
import argparse
import sys

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError
from llmjax.posttrain.config import load_posttrain_config


def main_for(stage: str, run, summary, argv=None) -> int:
    """Parse the arguments, run `run(cfg)`, print `summary(result)`."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{stage}",
                                     epilog="Overrides are dotted keys, e.g. steps=100 model.n_layers=4.")
    parser.add_argument("--config", help=f"YAML file (experiments/configs/{stage}*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow options
    try:
        result = run(load_posttrain_config(args.config, args.overrides))
    except (ConfigError, CheckpointError, ValueError) as e:  # CheckpointError: init_from without a checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit("experiments.posttrain is the shared command line of python -m experiments.sft, .dpo and .rlhf; "
             "run one of those")
