"""Sample from a trained run or a Hugging Face checkpoint folder.

`python -m experiments.generate --run runs/<name> --prompt "..."` or `--hf <dir> --prompt "..."`.
`--draft <run or HF dir> --gamma N` decodes speculatively with that draft model (same vocabulary);
`--int8` quantizes the matmul weights to int8. Prints the text, then (on stderr) tokens/s of a
second, already compiled run and, with a draft, the acceptance rate.
"""
import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError, DecodeConfig
from llmjax.convert import ConversionError, load_hf_model
from llmjax.decode import generate, prepare_decode, speculative_generate
from llmjax.runs import load_run


def load_model(path, step=None):
    """(decode config or None, model, tokenizer) of a run folder or a Hugging Face folder."""
    if (pathlib.Path(path) / "config.json").exists() and not (pathlib.Path(path) / "config.yaml").exists():
        _, model, tokenizer = load_hf_model(path)
        return None, model, tokenizer
    cfg, model, tokenizer = load_run(path, step)
    return cfg.decode, model, tokenizer


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
    parser.add_argument("--draft", help="draft model (run or Hugging Face folder) for speculative decoding")
    parser.add_argument("--gamma", type=int, help="draft tokens per speculative round (with --draft; default 4)")
    parser.add_argument("--int8", action="store_true", help="int8 weight-only quantization of the matmul weights")
    args = parser.parse_args(argv)
    if args.gamma is not None and not args.draft:
        parser.error(f"--gamma {args.gamma} needs --draft (the model that proposes the tokens)")
    args.gamma = 4 if args.gamma is None else args.gamma
    try:
        decode, model, tokenizer = load_model(args.run or args.hf, args.step)
        decode = decode or DecodeConfig()
        if tokenizer is None:
            raise ConversionError(f"{args.hf} has no tokenizer.json to encode the prompt with")
        chosen = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed).items()
                  if v is not None}
        decode = dataclasses.replace(decode, **chosen)
        target = prepare_decode(model, int8=args.int8)
        prompt = jnp.asarray([tokenizer.encode(args.prompt) or [tokenizer.eos_id]], jnp.int32)
        if args.draft:
            draft = prepare_decode(load_model(args.draft)[1], int8=args.int8)

            def run():
                return speculative_generate(target, draft, prompt, decode, gamma=args.gamma,
                                            vocab_size=tokenizer.vocab_size)
        else:
            def run():
                return generate(target, prompt, decode, vocab_size=tokenizer.vocab_size)
        result = run()
    except (CheckpointError, ConfigError, ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = result.tokens if args.draft else result
    print(tokenizer.decode(np.asarray(tokens[0]).tolist()))
    start = time.perf_counter()
    jax.block_until_ready(run().tokens if args.draft else run())  # compiled now: decode speed alone
    seconds = time.perf_counter() - start
    stats = f"{decode.max_new_tokens} new tokens in {seconds:.3f} s: {decode.max_new_tokens / seconds:.1f} tokens/s"
    if args.draft:
        stats += (f"; speculative gamma={args.gamma}: acceptance rate {result.acceptance_rate:.3f}, "
                  f"{result.tokens_per_round:.2f} tokens per target forward")
    print(stats, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
