"""Tokenizers: the bundled byte-level BPE, raw bytes, or any HF `tokenizer.json`.

Every tokenizer has `encode(text) -> list[int]`, `encode_batch(texts)`,
`decode(ids) -> str`, `vocab_size` (ids are in `[0, vocab_size)`) and
`eos_id` (the end-of-document token, appended after each document when a
corpus is tokenized). Encoding adds no special tokens (but an HF tokenizer
maps a literal "<|endoftext|>" in the text to its EOS id); decoding drops them.
"""
import os
import pathlib
from collections.abc import Sequence
from typing import Protocol

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

BUNDLED_TOKENIZER = pathlib.Path(__file__).parent / "assets" / "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# Looked up, in this order, to find the EOS of a loaded tokenizer.json.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded: unknown name, missing or bad file."""


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256 (vocab 257)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes byte ids; EOS is dropped, invalid UTF-8 becomes U+FFFD.

        Raises:
          ValueError: an id outside [0, 257).
        """
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self.vocab_size]:
            raise ValueError(f"byte tokenizer got id {bad[0]}; ids must be in [0, {self.vocab_size})")
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind the `Tokenizer` interface.

    Attributes:
      hf: the wrapped `tokenizers.Tokenizer`.
      vocab_size: number of ids, added (special) tokens included.
      eos_id: id of the first of `EOS_CANDIDATES` in the vocabulary, or None
        when it has none (then it can encode and decode, but
        `tokenize_documents` refuses it: documents need a separator).
    """

    def __init__(self, hf: tokenizers.Tokenizer):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        ids = (hf.token_to_id(t) for t in EOS_CANDIDATES)
        self.eos_id = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in parallel (Rust threads); same ids as `encode`."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokenizer as an HF `tokenizer.json` (deterministic bytes)."""
        self.hf.save(str(path), pretty=True)


def train_bpe(texts: Sequence[str], vocab_size: int = 8192) -> HFTokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Byte-level pre-tokenizer (GPT-2 split regex, no prefix space) and decoder,
    so any string round-trips exactly; all 256 bytes are in the base alphabet;
    `<|endoftext|>` is special token 0 and the EOS. Same texts give the same
    tokenizer.

    Args:
      texts: training documents.
      vocab_size: total vocabulary size, EOS included.

    Returns:
      The trained tokenizer (`vocab_size` ids, fewer if `texts` run out of merges).

    Raises:
      ValueError: `vocab_size` < 257 (256 bytes + EOS).
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} too small; byte-level BPE needs >= 257 (256 bytes + EOS)")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return HFTokenizer(hf)


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer by name or path.

    Args:
      spec: "bundled" (byte-level BPE, vocab 8192, trained on the bundled
        Shakespeare corpus), "bytes" (`ByteTokenizer`), or a path to an HF
        `tokenizer.json` or to a folder holding one. `~` is expanded.

    Returns:
      The tokenizer.

    Raises:
      TokenizerError: the file does not exist or is not a valid `tokenizer.json`.
    """
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = BUNDLED_TOKENIZER if str(spec) == "bundled" else pathlib.Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {str(spec)!r}: no such file {path} "
            "(use 'bundled', 'bytes', or a path to an HF tokenizer.json)"
        )
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on bad JSON
        raise TokenizerError(f"tokenizer file {path} is not a valid HF tokenizer.json: {e}") from e
    return HFTokenizer(hf)
