"""The chat template, and instruction / preference data made offline from the bundled corpus.

Template (plain text, so any tokenizer encodes it; the only special token is EOS):

    <|user|>
    {prompt}
    <|assistant|>
    {response}<EOS>

Everything up to and including "<|assistant|>\\n" is the prompt; the response and its EOS
are what the loss sees (`encode_chat` returns the mask). The data come from the speeches of
the plays ("NAME:\\n" then lines, speeches separated by a blank line):
- "continue": "Continue this passage:\\n<first lines of a speech>" -> the next lines;
- "next_speaker": "Who speaks next?\\n<a speech with its speaker>" -> the next speaker's name.
Preference pairs take a "continue" example: chosen = the true continuation, rejected = the
same words shuffled (or, for a one-word continuation, another speech's lines).
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np

USER, ASSISTANT = "<|user|>\n", "\n<|assistant|>\n"


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


def format_prompt(prompt: str) -> str:
    """The templated prompt: what the model sees before it answers."""
    return f"{USER}{prompt}{ASSISTANT}"


def encode_chat(tokenizer, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [L] int32, response_mask [L] bool) of one templated example; the mask is True on
    the response tokens and the final EOS, False on the prompt.

    Raises:
      ValueError: empty response, or a tokenizer without EOS.
    """
    if not response:
        raise ValueError(f"empty response for prompt {prompt[:40]!r}: nothing to learn")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token; the chat template ends each response with it")
    p, r = tokenizer.encode(format_prompt(prompt)), tokenizer.encode(response) + [tokenizer.eos_id]
    ids = np.asarray(p + r, np.int32)
    return ids, np.arange(len(ids)) >= len(p)


def _speeches(docs: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech in the plays, in order."""
    out = []
    for doc in docs:
        for block in doc.split("\n\n"):
            lines = block.strip("\n").split("\n")
            if len(lines) >= 2 and lines[0].endswith(":") and lines[0][:-1].isupper():
                out.append((lines[0][:-1], lines[1:]))
    return out


def instruction_examples(docs: list[str], n: int, seed: int = 0, max_lines: int = 2) -> list[Example]:
    """`n` instruction examples (half "continue", half "next_speaker"), deterministic in seed.

    Raises:
      ValueError: n < 1, or the documents hold no speeches ("NAME:" blocks).
    """
    if n < 1:
        raise ValueError(f"n={n} examples: need at least 1")
    speeches = _speeches(docs)
    if len(speeches) < 2:
        raise ValueError("the corpus has fewer than 2 speeches ('NAME:' then lines); cannot make examples")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        i = rng.randrange(len(speeches) - 1)
        speaker, lines = speeches[i]
        if len(out) % 2 == 0 and len(lines) >= 2:
            cut = min(max_lines, len(lines) - 1)
            out.append(Example("Continue this passage:\n" + "\n".join(lines[:cut]),
                               "\n".join(lines[cut:cut + max_lines])))
        else:
            text = f"{speaker}:\n" + "\n".join(lines[:max_lines])
            out.append(Example("Who speaks next?\n" + text, speeches[i + 1][0]))
    return out


def _corrupt(text: str, rng: random.Random, other: str) -> str:
    words = text.split(" ")
    for _ in range(10):
        rng.shuffle(words)
        if " ".join(words) != text:
            return " ".join(words)
    return other


def preference_pairs(docs: list[str], n: int, seed: int = 0, max_lines: int = 2) -> list[Preference]:
    """`n` (prompt, chosen, rejected) triples: the true continuation of a passage preferred
    over its words shuffled. Deterministic in seed; chosen != rejected always.

    Raises:
      ValueError: as `instruction_examples`.
    """
    rng = random.Random(seed + 1)
    pool = [e for e in instruction_examples(docs, 4 * n, seed, max_lines) if e.prompt.startswith("Continue")]
    out = []
    for e in pool:
        rejected = _corrupt(e.response, rng, rng.choice(pool).response)
        if rejected != e.response:
            out.append(Preference(e.prompt, e.response, rejected))
        if len(out) == n:
            return out
    raise ValueError(f"could make only {len(out)} of n_examples={n} preference pairs from this corpus; "
                     "lower n_examples")


def fits(tokenizer, prompt: str, response: str, seq_len: int) -> bool:
    """Whether the templated example gives at most seq_len (input, target) pairs."""
    return len(encode_chat(tokenizer, prompt, response)[0]) - 1 <= seq_len
