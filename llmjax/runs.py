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

    Raises:
      CheckpointError: no config.yaml or no readable checkpoint in run_dir.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: no config.yaml")
    cfg = load_config(run_dir / "config.yaml")

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
