"""Batches of templated examples: one per row (padded), or packed several per row.

A batch is a dict of [N, T] arrays: `tokens` (inputs), `targets` (next tokens), `weights`
(1.0 where the target is a response token, else 0), `segment_ids` (1, 2, ... per example
in the row, 0 for padding) and `positions` (restarting at 0 for each example). An example
of L ids gives L - 1 (input, target) pairs, so it needs L - 1 <= T.
"""
from __future__ import annotations

import numpy as np

FIELDS = ("tokens", "targets", "weights", "segment_ids", "positions")


def _check_fits(examples, seq_len: int):
    for i, (ids, _) in enumerate(examples):
        if len(ids) - 1 > seq_len:
            raise ValueError(f"example {i} has {len(ids)} tokens (prompt + response), longer than the "
                             f"context: at most seq_len + 1 = {seq_len + 1}; shorten it or raise seq_len")
        if len(ids) < 2:
            raise ValueError(f"example {i} has {len(ids)} token(s): need a prompt and a response")


def _fill(rows: list[list[int]], examples, seq_len: int) -> dict[str, np.ndarray]:
    batch = {f: np.zeros((len(rows), seq_len), np.float32 if f == "weights" else np.int32) for f in FIELDS}
    for r, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, 1):
            ids, mask = examples[i]
            n = len(ids) - 1
            sl = slice(start, start + n)
            batch["tokens"][r, sl], batch["targets"][r, sl] = ids[:-1], ids[1:]
            batch["weights"][r, sl] = mask[1:]
            batch["segment_ids"][r, sl], batch["positions"][r, sl] = seg, np.arange(n)
            start += n
    return batch


def pad_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """One example per row, padded to seq_len. examples: (ids, response_mask) pairs.

    Raises:
      ValueError: an example longer than seq_len + 1 tokens (prompt longer than the context).
    """
    _check_fits(examples, seq_len)
    return _fill([[i] for i in range(len(examples))], examples, seq_len)


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """Examples packed greedily in order into rows of seq_len; an example never splits
    across rows (a row is closed when the next one does not fit).

    Raises:
      ValueError: an example longer than seq_len + 1 tokens.
    """
    _check_fits(examples, seq_len)
    rows, used = [[]], 0
    for i, (ids, _) in enumerate(examples):
        if used + len(ids) - 1 > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(ids) - 1
    return _fill(rows, examples, seq_len)
