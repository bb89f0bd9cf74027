"""Sample from a trained run or a Hugging Face checkpoint folder.

`python -m experiments.generate --run runs/<name> --prompt "..."` or `--hf <dir> --prompt "..."`.
"""
import argparse
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError, DecodeConfig
from llmjax.convert import ConversionError, load_hf_model
from llmjax.decode import generate
from llmjax.runs import load_run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder, e.g. runs/shakespeare")
    source.add_argument("--hf", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's decode.max_new_tokens")
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    args = parser.parse_args(argv)
    try:
        if args.run:
            cfg, model, tokenizer = load_run(args.run, args.step)
            decode = cfg.decode
        else:
            _, model, tokenizer = load_hf_model(args.hf)
            decode = DecodeConfig()
            if tokenizer is None:
                raise ConversionError(f"{args.hf} has no tokenizer.json to encode the prompt with")
        chosen = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed).items()
                  if v is not None}
        decode = dataclasses.replace(decode, **chosen)
        ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
        out = generate(model, jnp.asarray([ids], jnp.int32), decode, vocab_size=tokenizer.vocab_size)
    except (CheckpointError, ConfigError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(np.asarray(out[0]).tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
