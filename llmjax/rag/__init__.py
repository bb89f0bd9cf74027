"""Retrieval-augmented generation over a text collection: passages, BM25 and dense retrieval,
prompt assembly, generation through the engine (see pipeline.py)."""
from llmjax.rag.bm25 import BM25
from llmjax.rag.dense import DenseIndex, embed_texts
from llmjax.rag.passages import Passage, RagError, chunk_documents, load_passages
from llmjax.rag.pipeline import (
    RETRIEVERS,
    Answer,
    RagPipeline,
    assemble_prompt,
    fragment_questions,
    make_retriever,
    recall_at_k,
)

__all__ = [
    "BM25", "RETRIEVERS", "Answer", "DenseIndex", "Passage", "RagError", "RagPipeline",
    "assemble_prompt", "chunk_documents", "embed_texts", "fragment_questions", "load_passages",
    "make_retriever", "recall_at_k",
]
