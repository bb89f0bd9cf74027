"""Opening a finished (or interrupted) run: its config, newest params and tokenizer."""
from pathlib import Path

import jax
from flax import nnx

from llmjax.checkpoint import Checkpointer, CheckpointError
from llmjax.config import load_config
from llmjax.data import load_tokenizer
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state


def load_run(run_dir, step: int | None = None):
    """(config, model, tokenizer) of `run_dir` at checkpoint `step` (default: the newest).

    A LoRA run's checkpoints hold only adapters, so its model is the merged export the run
    wrote at its end (`run_dir/merged`, a Hugging Face folder).

    Raises:
      CheckpointError: no config.yaml or no readable checkpoint in run_dir; for a LoRA run, a
        `step` (adapters alone are not a model) or no merged export yet.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: no config.yaml")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.lora.rank > 0:
        merged = run_dir / "merged"
        if step is not None or not (merged / "config.json").is_file():
            raise CheckpointError(
                f"{run_dir} is a LoRA run: its checkpoints hold adapters only, and its model is the merged "
                f"export {merged} written when the run finishes"
                + (f" (asked for step {step})" if step is not None else " (not there yet: it appears when the run "
                   "finishes; continue it with `python -m experiments.train --resume ...`)"))
        from llmjax.convert import load_hf_model

        _, model, _ = load_hf_model(merged, dtype=cfg.model.dtype)
        return cfg, model, load_tokenizer(cfg.data.tokenizer)

    # Shapes only: nothing is initialized.
    graphdef, params = split_model(nnx.eval_shape(lambda: init_model(cfg.model)))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    template = jax.eval_shape(lambda p: init_train_state(p, optimizer), params)
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        state, _ = ckpt.restore(template, step)
    finally:
        ckpt.close()
    return cfg, nnx.merge(graphdef, state["params"]), load_tokenizer(cfg.data.tokenizer)
