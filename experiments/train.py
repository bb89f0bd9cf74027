"""Train a model: `python -m experiments.train --config experiments/configs/<x>.yaml [key=value ...]`.

Writes runs/<name>/ (config.yaml, metrics.jsonl, tb/, checkpoints/, samples.txt); a LoRA
run (lora.rank >= 1) also writes its merged model as a Hugging Face folder, runs/<name>/merged/.
"""
import argparse
import dataclasses
import sys

from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError, load_config
from llmjax.convert import ConversionError, load_hf, save_hf
from llmjax.data import load_tokenizer
from llmjax.train.loop import TrainingDiverged, train
from sharding import distributed

_KEPT_MODEL_FIELDS = ("dtype", "attention_impl", "norm_impl", "loss_impl", "remat")


def _with_hf_model(cfg, hf_dir, overrides):
    """cfg with model.* from the checkpoint (keeping the run's compute choices) and its params."""
    hf_model, params = load_hf(hf_dir, param_dtype=cfg.model.param_dtype)
    kept = {f: getattr(cfg.model, f) for f in _KEPT_MODEL_FIELDS}
    data = cfg.data
    if not any(o.startswith("data.tokenizer=") for o in overrides) and data.tokenizer == "bundled":
        data = dataclasses.replace(data, tokenizer=str(hf_dir))
    seq_len = min(data.seq_len, hf_model.max_seq_len)
    return (dataclasses.replace(cfg, model=dataclasses.replace(hf_model, **kept),
                                data=dataclasses.replace(data, seq_len=seq_len)), params)


def export_hf(cfg, params, path):
    """Write `params` (a LoRA run's merged params) as a Hugging Face checkpoint folder, with
    the run's tokenizer.json when it has one (BPE), and say where."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    savable = hasattr(tokenizer, "save")
    save_hf(cfg.model, params, path, tokenizer=tokenizer if savable else None)
    use = (f"python -m experiments.generate --hf {path}" if savable else  # generate --hf needs its tokenizer.json
           f"no tokenizer.json for data.tokenizer={cfg.data.tokenizer}: decode the run with "
           f"python -m experiments.generate --run {cfg.run_dir}")
    print(f"wrote Hugging Face checkpoint {path} ({use})")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.train", description=__doc__.splitlines()[0],
        epilog="Overrides are dotted keys, e.g. model.n_layers=4 train.steps=200 preset=gpt2-tiny.")
    parser.add_argument("--config", help="YAML experiment file (experiments/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name> from its newest checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop (with a checkpoint) after this step")
    parser.add_argument("--init-from-hf", metavar="DIR",
                        help="start from a Hugging Face checkpoint folder: its architecture replaces model.* "
                             "(model.dtype and the *_impl/remat choices stay yours), its tokenizer.json "
                             "is used unless data.tokenizer is set")
    parser.add_argument("--export-hf", metavar="DIR",
                        help="when training finishes, write the model (merged with its LoRA adapters) as a "
                             "Hugging Face checkpoint folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (eval lines still print)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow options
    try:
        cfg = load_config(args.config, args.overrides)
        if args.stop_after is not None and not 1 <= args.stop_after <= cfg.train.steps:
            raise ConfigError("--stop-after", args.stop_after, f"a step in [1, train.steps={cfg.train.steps}]")
        distributed.initialize(cfg.mesh)  # several processes: join before any device is touched
        init_params = None
        if args.init_from_hf:  # on resume too: the architecture, and a LoRA run's frozen base
            cfg, init_params = _with_hf_model(cfg, args.init_from_hf, args.overrides)
        result = train(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                       init_params=init_params)
        if not result.stopped_by_signal:
            if cfg.lora.rank > 0:
                export_hf(cfg, result.params, cfg.run_dir / "merged")
            if args.export_hf:
                export_hf(cfg, result.params, args.export_hf)
    except (ConfigError, CheckpointError, ConversionError, TrainingDiverged, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.val_loss is not None:
        print(f"done: step {result.step}, val loss {result.val_loss:.4f} nats/token "
              f"(unigram entropy of the corpus: {result.unigram_entropy:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
