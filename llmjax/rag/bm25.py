"""Okapi BM25 (Robertson and Zaragoza, "The Probabilistic Relevance Framework: BM25 and
Beyond", 2009, eq. 3.15-3.17), the lexical baseline, in numpy.

score(q, d) = sum over query terms t of idf(t) * tf(t, d) (k1 + 1) /
(tf(t, d) + k1 (1 - b + b |d| / avgdl)), idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
(the Lucene idf, never negative).
"""
import collections
import re

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-case word terms of `text` (letters, digits, apostrophes)."""
    return _WORD.findall(text.lower())


class BM25:
    """A BM25 index over `texts`: postings (passage ids and term counts) per term."""

    def __init__(self, texts, *, k1: float = 1.5, b: float = 0.75):
        if not texts:
            raise ValueError("BM25 needs at least one text")
        self.k1, self.b, self.n = k1, b, len(texts)
        postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self.lengths = np.zeros(self.n, np.float64)
        for i, text in enumerate(texts):
            terms = words(text)
            self.lengths[i] = len(terms)
            for term, count in collections.Counter(terms).items():
                postings[term].append((i, count))
        self.postings = {t: (np.array([i for i, _ in p]), np.array([c for _, c in p], np.float64))
                         for t, p in postings.items()}
        self.avg_length = max(self.lengths.mean(), 1e-9)

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return float(np.log(1.0 + (self.n - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for `query`: [n] float64 (a repeated query term counts
        once per occurrence)."""
        out = np.zeros(self.n)
        norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avg_length)  # [n]
        for term in words(query):
            if term not in self.postings:
                continue
            ids, tf = self.postings[term]
            out[ids] += self.idf(term) * tf * (self.k1 + 1) / (tf + norm[ids])
        return out

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [k], ids [k]) of the k best passages, best first (ties: lower id first)."""
        s = self.scores(query)
        k = min(k, self.n)
        top = np.argpartition(-s, k - 1)[:k]
        top = top[np.lexsort((top, -s[top]))]
        return s[top], top
