"""Retrieval-augmented generation (Lewis et al., NeurIPS 2020, arXiv:2005.11401): retrieve
passages for a question, put them before it in the prompt, and generate with the engine.

The passages go into the prompt in a canonical order (ascending id), each tokenized on its
own, so two questions that retrieve the same passages share a token-identical prompt prefix
and the engine's prefix cache serves that prefix's KV blocks to the second one: document KV
reuse without a second cache (vLLM automatic prefix caching; see llmjax.decode.paged).
"""
import dataclasses
import time

import numpy as np

from llmjax.rag.bm25 import BM25
from llmjax.rag.dense import DenseIndex, embed_texts
from llmjax.rag.passages import Passage, RagError

RETRIEVERS = ("bm25", "embed")
PASSAGE_SEPARATOR = "\n\n"


def make_retriever(kind: str, passages: list[Passage], model=None, tokenizer=None, index=None):
    """A function (question, k) -> (scores [k], ids [k]), best first.

    kind "bm25": BM25 over the passage texts. kind "embed": cosine over mean-pooled hidden
    states of `model` (with `tokenizer`); `index` (a DenseIndex) is built from the passages
    when not given.
    Raises:
      RagError: unknown kind, no passages, "embed" without a model, or an index whose size
        differs from the collection's.
    """
    if kind not in RETRIEVERS:
        raise RagError(f"retriever={kind!r}; allowed: {', '.join(RETRIEVERS)}")
    if not passages:
        raise RagError("the collection is empty: no passages to retrieve from")
    if kind == "bm25":
        bm25 = BM25([p.text for p in passages])
        return bm25.search
    if model is None or tokenizer is None:
        raise RagError("retriever='embed' needs a model and its tokenizer (e.g. --run runs/shakespeare)")
    index = index or DenseIndex(embed_texts(model, tokenizer, [p.text for p in passages]))
    if len(index) != len(passages):
        raise RagError(f"the dense index holds {len(index)} vectors but the collection has "
                       f"{len(passages)} passages; rebuild the index")

    def search(question, k):
        scores, ids = index.search(embed_texts(model, tokenizer, [question]), k)
        return scores[0], ids[0]

    return search


def assemble_prompt(tokenizer, passages: list[Passage], ranked_ids, question: str, budget: int):
    """Prompt tokens: retrieved passages (as many of `ranked_ids` as fit, best first, then
    placed in ascending id order) followed by the question, at most `budget` tokens in all.

    Returns (tokens, ids of the passages used, in prompt order).
    Raises:
      RagError: the question alone does not fit the budget.
    """
    question_tokens = tokenizer.encode(f"{question}\n")
    if len(question_tokens) > budget:
        raise RagError(f"the question is {len(question_tokens)} tokens, longer than the context "
                       f"budget of {budget} tokens (model max_seq_len minus max_new_tokens)")
    room, used = budget - len(question_tokens), {}
    for pid in ranked_ids:
        tokens = tokenizer.encode(passages[int(pid)].text + PASSAGE_SEPARATOR)
        if len(tokens) <= room:
            used[int(pid)] = tokens
            room -= len(tokens)
    order = sorted(used)
    return [t for pid in order for t in used[pid]] + question_tokens, order


@dataclasses.dataclass
class Answer:
    """One question's result: hits [(passage, score)] best first, the passages used in the
    prompt, the prompt and generated text, time to first token, and prompt tokens whose KV
    came from the prefix cache."""
    hits: list
    used: list[int]
    prompt_tokens: int
    text: str
    ttft_s: float
    cached_tokens: int


class RagPipeline:
    """Retriever + prompt assembly + an `llmjax.decode.Engine` (greedy unless `sampling`)."""

    def __init__(self, passages, tokenizer, engine, retrieve, *, max_new_tokens: int = 32,
                 sampling: dict | None = None):
        self.passages, self.tokenizer, self.engine, self.retrieve = passages, tokenizer, engine, retrieve
        self.max_new_tokens, self.sampling = max_new_tokens, sampling or {"temperature": 0.0}

    def answer(self, question: str, k: int = 5) -> Answer:
        """Retrieve k passages, assemble the prompt, generate.

        Raises:
          RagError: empty question, k < 1, or a question that does not fit the context.
        """
        if not question.strip():
            raise RagError("the question is empty")
        if k < 1:
            raise RagError(f"k={k} must be >= 1")
        scores, ids = self.retrieve(question, k)
        budget = self.engine.context - self.max_new_tokens
        tokens, used = assemble_prompt(self.tokenizer, self.passages, ids, question, budget)
        start = time.perf_counter()
        seq_id = self.engine.submit(tokens, self.max_new_tokens, self.sampling, arrival=start)
        seq = self.engine.run()[seq_id]
        return Answer(hits=[(self.passages[int(i)], float(s)) for s, i in zip(scores, ids)], used=used,
                      prompt_tokens=len(tokens), text=self.tokenizer.decode(seq.generated),
                      ttft_s=seq.first_token_time - start, cached_tokens=seq.cached_tokens)


def fragment_questions(passages: list[Passage], n: int, *, words: int = 6, seed: int = 0):
    """A generated retrieval test: n (question, relevant ids) pairs. The question is `words`
    consecutive words of one line of a random passage; relevant = every passage whose text
    holds those words in that order (a line can recur). Passages without a line of at least
    `words` words are not drawn.
    """
    rng = np.random.default_rng(seed)
    candidates = [p for p in passages if any(len(line.split()) >= words for line in p.text.splitlines())]
    if not candidates:
        raise RagError(f"no passage has a line of {words} words to build a question from")
    normalized = [" ".join(p.text.split()) for p in passages]
    out = []
    for i in rng.choice(len(candidates), size=min(n, len(candidates)), replace=False):
        passage = candidates[int(i)]
        lines = [line.split() for line in passage.text.splitlines() if len(line.split()) >= words]
        line = lines[rng.integers(len(lines))]
        start = int(rng.integers(len(line) - words + 1))
        question = " ".join(line[start:start + words])
        out.append((question, {j for j, text in enumerate(normalized) if question in text}))
    return out


def recall_at_k(retrieve, questions, k: int) -> float:
    """Fraction of questions with a relevant passage among the top k."""
    hits = sum(bool(set(int(i) for i in retrieve(q, k)[1]) & relevant) for q, relevant in questions)
    return hits / len(questions)
