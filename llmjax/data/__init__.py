"""Corpora, tokenizers, packing into windows, train/val split, resumable batches."""
from llmjax.data.corpus import BUNDLED_CORPORA, CorpusError, load_corpus
from llmjax.data.dataset import (
    BatchIterator,
    Dataset,
    load_dataset,
    make_windows,
    tokenize_documents,
    train_val_windows,
    unigram_entropy,
)
from llmjax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BUNDLED_CORPORA", "BatchIterator", "ByteTokenizer", "CorpusError", "Dataset", "HFTokenizer",
    "Tokenizer", "TokenizerError", "load_corpus", "load_dataset", "load_tokenizer", "make_windows",
    "tokenize_documents", "train_bpe", "train_val_windows", "unigram_entropy",
]
