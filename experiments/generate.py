"""Sample from a trained run: `python -m experiments.generate --run runs/<name> --prompt "..."`."""
import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError
from llmjax.decode import generate
from llmjax.runs import load_run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__)
    parser.add_argument("--run", required=True, help="run folder, e.g. runs/shakespeare")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's decode.max_new_tokens")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    args = parser.parse_args(argv)
    try:
        cfg, model, tokenizer = load_run(args.run, args.step)
        chosen = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed).items()
                  if v is not None}
        decode = dataclasses.replace(cfg.decode, **chosen)
        ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
        out = generate(model, jnp.asarray([ids], jnp.int32), decode, vocab_size=tokenizer.vocab_size)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(np.asarray(out[0]).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
