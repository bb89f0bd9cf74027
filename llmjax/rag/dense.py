"""Dense retrieval: passages and queries embedded as the mean of a model's final-norm hidden
states, and an exact cosine top-k index in jnp.

A causal LM's hidden states share a large common direction (anisotropy; Ethayarajh, EMNLP
2019), so every cosine would be near 1; the index subtracts the collection's mean vector and,
by default, whitens (BERT-whitening, Su et al. 2021, arXiv:2103.15316: map the collection's
covariance to the identity) before normalizing. On 3,000 passages of the plays with the
shakespeare run, recall@5 of fragment questions went from 0.02 (centered) to 0.09 (whitened);
over all 35,713 passages (32 words) from 0.01 to 0.02 (BM25: 0.995). A 4-layer LM is a weak encoder.
"""
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.rag.passages import RagError


@partial(jax.jit, static_argnames=("graphdef",))
def _mean_hidden(graphdef, state, tokens, mask):
    """Mean over the unmasked positions of the hidden states: tokens, mask [B, T] -> [B, D]."""
    hidden, _ = nnx.merge(graphdef, state).hidden_states(tokens)
    weights = mask.astype(jnp.float32)[:, :, None]
    return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def embed_texts(model, tokenizer, texts, *, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled hidden states of each text: [n, D] float32 (texts cut to the model's
    max_seq_len tokens). Batches are padded to min(n, batch_size) rows and a power-of-2 length,
    so the model compiles a few times, not once per batch."""
    graphdef, state = nnx.split(model)
    batch_size = max(1, min(batch_size, len(texts)))
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [tokenizer.encode(t)[:model.cfg.max_seq_len] or [0] for t in texts[start:start + batch_size]]
        length = min(model.cfg.max_seq_len, max(16, 1 << (max(map(len, encoded)) - 1).bit_length()))
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), bool)
        for row, ids in enumerate(encoded):
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, True
        out.append(np.asarray(_mean_hidden(graphdef, state, tokens, mask))[:len(encoded)])
    return np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)


@partial(jax.jit, static_argnames=("k",))
def _top_k(vectors, queries, k):
    scores = queries @ vectors.T  # [Q, n] cosines (both sides unit length)
    return jax.lax.top_k(scores, k)


class DenseIndex:
    """Exact top-k by cosine over passage vectors [n, D], after centering on the collection
    mean and (whiten=True) multiplying by W = U diag(1 / sqrt(eigenvalues)) of its covariance."""

    def __init__(self, vectors, center=None, *, whiten: bool = True):
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise RagError(f"a dense index needs [n >= 1, dim] vectors; got shape {vectors.shape}")
        self.center = vectors.mean(0) if center is None else np.asarray(center, np.float32)
        self.transform = np.eye(vectors.shape[1], dtype=np.float32)
        if whiten and len(vectors) > 1:
            eigenvalues, basis = np.linalg.eigh(np.cov((vectors - self.center).T))
            self.transform = (basis / np.sqrt(np.maximum(eigenvalues, 0) + 1e-6)).astype(np.float32)
        self.vectors = jnp.asarray(self.normalize(vectors))

    def normalize(self, vectors) -> np.ndarray:
        """Center on the collection mean, whiten, and scale each row to unit length."""
        x = (np.asarray(vectors, np.float32) - self.center) @ self.transform
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, query_vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [Q, k], ids [Q, k]) of the k nearest passages per query [Q, D], best first."""
        k = min(k, len(self))
        scores, ids = _top_k(self.vectors, jnp.asarray(self.normalize(np.atleast_2d(query_vectors))), k)
        return np.asarray(scores), np.asarray(ids)

    def save(self, path) -> None:
        """Write the unit vectors, the center and the whitening transform to `path` (.npz)."""
        np.savez(path, vectors=np.asarray(self.vectors), center=self.center, transform=self.transform)

    @classmethod
    def load(cls, path) -> "DenseIndex":
        """Read an index written by `save`.

        Raises:
          RagError: no such file.
        """
        if not Path(path).is_file():
            raise RagError(f"no dense index at {path}; build one with `python -m experiments.rag --save-index "
                           f"{path} ...` or DenseIndex(embed_texts(...)).save(path)")
        with np.load(path) as data:
            index = cls.__new__(cls)
            index.center, index.transform = data["center"], data["transform"]
            index.vectors = jnp.asarray(data["vectors"])
        return index
