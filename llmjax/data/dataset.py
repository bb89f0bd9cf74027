"""From documents to training batches: tokenize, pack into windows, split, iterate.

A corpus becomes one int32 token stream (EOS after each document), cut into
windows of `seq_len + 1` tokens with stride `seq_len`: window i is
`tokens[i*T : i*T + T + 1]`, its inputs are `w[:-1]` and its targets `w[1:]`,
so each stream position is the target of exactly one window (adjacent windows
share one boundary token, an input of the later one). Every k-th window,
k = round(1 / val_fraction), goes to val: val is spread over the whole corpus
and its targets are never trained on.
"""
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from llmjax.data.corpus import load_corpus
from llmjax.data.tokenizer import Tokenizer, load_tokenizer


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenizes documents into one stream, EOS after each.

    Args:
      docs: the documents.
      tokenizer: any `Tokenizer` with an `eos_id`.

    Returns:
      int32 [n_tokens]: doc 0, EOS, doc 1, EOS, ...

    Raises:
      ValueError: the tokenizer has no EOS token.
    """
    if tokenizer.eos_id is None:
        raise ValueError("tokenizer has no EOS token (<|endoftext|>, </s> or <eos>) to separate documents")
    parts = []
    for ids in tokenizer.encode_batch(list(docs)):
        parts += [np.asarray(ids, dtype=np.int32), np.array([tokenizer.eos_id], dtype=np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def make_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Packs a stream into windows of seq_len + 1 tokens, stride seq_len.

    Args:
      tokens: int [n_tokens].
      seq_len: model sequence length T.

    Returns:
      A read-only view of `tokens`, [n_windows, T + 1] with
      n_windows = (n_tokens - 1) // T; the tail that fills no window is dropped.

    Raises:
      ValueError: seq_len < 1.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    tokens = np.asarray(tokens)
    n = max((len(tokens) - 1) // seq_len, 0)
    step = tokens.strides[0]
    return np.lib.stride_tricks.as_strided(
        tokens, shape=(n, seq_len + 1), strides=(seq_len * step, step), writeable=False
    )


def train_val_windows(tokens: np.ndarray, seq_len: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Packs a stream into windows and splits them: window i is val iff i % k == k - 1.

    Args:
      tokens: int [n_tokens], the whole corpus stream.
      seq_len: model sequence length T.
      val_fraction: in (0, 0.5]; k = round(1 / val_fraction).

    Returns:
      (train, val): int32 [n_train, T + 1] and [n_val, T + 1], in stream order.

    Raises:
      ValueError: val_fraction outside (0, 0.5], seq_len < 1, or fewer than k
        windows (no val or no train window); names seq_len and the token count.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 0.5]")
    k = round(1 / val_fraction)
    windows = make_windows(tokens, seq_len)
    n = len(windows)
    if n < k:
        raise ValueError(
            f"corpus too short: {len(tokens)} tokens give {n} windows of seq_len={seq_len} (+1), "
            f"but val_fraction={val_fraction} needs at least {k} (one val, the rest train); "
            "use a smaller seq_len or a larger corpus"
        )
    is_val = np.arange(n) % k == k - 1
    return (np.ascontiguousarray(windows[~is_val], np.int32),
            np.ascontiguousarray(windows[is_val], np.int32))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequency distribution, in nats per token.

    The loss of the best model that ignores context (always predicts the
    corpus frequencies); a trained model must go below it.

    Args:
      tokens: non-negative int, any shape.

    Returns:
      H = -sum_v p(v) ln p(v), p(v) = count(v) / n.

    Raises:
      ValueError: no tokens.
    """
    tokens = np.asarray(tokens).ravel()
    if tokens.size == 0:
        raise ValueError("unigram_entropy of an empty token array")
    counts = np.bincount(tokens)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


class BatchIterator:
    """Endless, deterministic, resumable batches of windows.

    Epoch e visits the windows in the order of a permutation drawn from
    `np.random.default_rng([seed, e])`, `batch_size` at a time; the ragged
    tail (n_windows % batch_size windows) of each epoch is dropped. The
    position is `state()`; an iterator given that state by `restore` (or made
    by `from_state`) yields the same batches from there on.

    Attributes:
      windows: [n_windows, T + 1] int32.
      batch_size, seed: as given.
      batches_per_epoch: n_windows // batch_size.
      epoch, index: position of the next batch (epoch, batch within epoch).
    """

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0):
        """Starts at epoch 0, batch 0.

        Raises:
          ValueError: batch_size < 1 or > n_windows, or seed < 0.
        """
        if not 1 <= batch_size <= len(windows):
            raise ValueError(f"batch_size={batch_size} must be in [1, {len(windows)}] (the number of windows)")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.windows = windows
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = len(windows) // batch_size
        self.epoch = 0
        self.index = 0
        self._perm_epoch, self._perm = -1, None

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> np.ndarray:
        """Returns int32 [batch_size, T + 1] and advances by one batch."""
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))
            self._perm_epoch = self.epoch
        start = self.index * self.batch_size
        batch = self.windows[self._perm[start:start + self.batch_size]]
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return np.asarray(batch, np.int32)

    def state(self) -> dict[str, int]:
        """The position of the next batch, as plain ints (JSON-serializable)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "batch_size": self.batch_size, "n_windows": len(self.windows)}

    def restore(self, state: dict[str, int]) -> None:
        """Moves to a position saved by `state()`.

        Raises:
          ValueError: the state was saved for another seed, batch size or
            number of windows, or its position is outside an epoch.
        """
        for key, value in [("seed", self.seed), ("batch_size", self.batch_size), ("n_windows", len(self.windows))]:
            if int(state[key]) != value:
                raise ValueError(f"iterator state has {key}={state[key]}, but this iterator has {key}={value}")
        if not (0 <= int(state["index"]) < self.batches_per_epoch and int(state["epoch"]) >= 0):
            raise ValueError(f"iterator state position epoch={state['epoch']} index={state['index']} is invalid "
                             f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    @classmethod
    def from_state(cls, windows: np.ndarray, state: dict[str, int]) -> "BatchIterator":
        """A new iterator over `windows` at the position saved in `state`."""
        it = cls(windows, state["batch_size"], state["seed"])
        it.restore(state)
        return it


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A tokenized corpus, packed and split.

    Attributes:
      tokenizer: the tokenizer that made the windows.
      train: int32 [n_train, seq_len + 1] windows.
      val: int32 [n_val, seq_len + 1] windows.
      unigram_entropy: nats/token of the train targets' unigram distribution.
    """

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    unigram_entropy: float

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def load_dataset(corpus: str | os.PathLike, tokenizer: str | os.PathLike, seq_len: int,
                 val_fraction: float) -> Dataset:
    """Loads, tokenizes, packs and splits a corpus.

    Args:
      corpus: a `load_corpus` source ("shakespeare", a text file, a folder).
      tokenizer: a `load_tokenizer` spec ("bundled", "bytes", a tokenizer.json).
      seq_len: model sequence length T.
      val_fraction: share of windows held out for val, in (0, 0.5].

    Returns:
      The `Dataset`.

    Raises:
      CorpusError, TokenizerError: bad corpus or tokenizer (both ValueError).
      ValueError: corpus too short for seq_len and val_fraction, or a
        tokenizer without EOS.
    """
    tok = load_tokenizer(tokenizer)
    tokens = tokenize_documents(load_corpus(corpus), tok)
    train, val = train_val_windows(tokens, seq_len, val_fraction)
    return Dataset(tok, train, val, unigram_entropy(train[:, 1:]))
