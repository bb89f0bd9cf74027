"""Run metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""
import json
import math
import time
from pathlib import Path

import numpy as np


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
        return math.inf


class MetricsLogger:
    """Metrics of a run directory (`metrics.jsonl`, `tb/` event files), appended step by step."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_after: int | None = None):
        """resume_after: the step a resumed run restarts after; the records of later steps that
        an earlier run logged (it crashed before its next checkpoint) are dropped, from
        metrics.jsonl and, by a purge mark, from TensorBoard."""
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_after is not None and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if _logged_step(line) <= resume_after]
            if len(kept) < len(lines):
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(kept))
                tmp.replace(self.path)  # atomic: a crash here leaves the old file
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: slow to import

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"),
                                     purge_step=None if resume_after is None else resume_after + 1)

    def log(self, step: int, **values):
        """Write `values` for `step`: numbers, or arrays (e.g. per-expert load) written as
        lists and to TensorBoard as one scalar per element (`key/i`); None values are dropped."""
        values = {k: _plain(v) for k, v in values.items() if v is not None}
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, list):
                    for i, x in enumerate(np.ravel(v)):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
                else:
                    self._tb.add_scalar(k, v, step)

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    """A number as float, an array as a (nested) list of floats."""
    array = np.asarray(value, dtype=np.float64)
    return float(array) if array.ndim == 0 else array.tolist()


def read_metrics(run_dir) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
