"""Checkpoints with orbax: train state (params, optimizer state, step) plus JSON metadata
(data-iterator position, resolved config). Saves are asynchronous; keep-N; restore onto
any sharding by passing a template whose leaves carry the wanted shardings.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, empty or unreadable; names the path."""


class Checkpointer:
    """A run's checkpoint folder: `<dir>/<step>/{state,meta}`.

    Args:
      directory: where step folders live (created on first save).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False)  # reading makes no folder
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def delete(self, step: int):
        """Remove the checkpoint of `step` (after pending saves finish)."""
        self.wait()
        self._manager.delete(step)

    def save(self, step: int, state, meta: dict):
        """Start saving `state` (a pytree of arrays) and `meta` (JSON-able) as `step`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def wait(self):
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def restore(self, template, step: int | None = None):
        """Restore (state, meta) of `step` (default: the newest) shaped like `template`.

        `template` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings to
        restore onto another mesh).

        Raises:
          CheckpointError: no checkpoint, or the files are unreadable / do not match.
        """
        steps = sorted(self._manager.all_steps())
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it holds steps {steps}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged folders
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e
        return restored["state"], restored["meta"]

    def close(self):
        self._manager.close()
