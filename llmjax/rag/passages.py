"""A document collection cut into passages with stable ids.

Passages follow the text's own paragraphs (blank-line separated: in the bundled plays, one
speech or stage direction each), packed greedily up to `max_words`; a paragraph longer than
that is cut at line ends. A passage never crosses a document boundary.
"""
import dataclasses
import re

from llmjax.data import load_corpus

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class RagError(ValueError):
    """Input the retrieval pipeline cannot use: empty collection, missing index, a query that
    does not fit the context."""


@dataclasses.dataclass(frozen=True)
class Passage:
    """id: position in the collection (0..n-1); doc: index of its document; title: the
    document's first line; text: the passage itself."""
    id: int
    doc: int
    title: str
    text: str


def _pieces(paragraph: str, max_words: int) -> list[str]:
    """The paragraph, or its lines grouped into runs of at most max_words words."""
    if len(paragraph.split()) <= max_words:
        return [paragraph]
    pieces, lines = [], []
    for line in paragraph.splitlines():
        if lines and len(" ".join(lines + [line]).split()) > max_words:
            pieces.append("\n".join(lines))
            lines = []
        lines.append(line)
    return pieces + ["\n".join(lines)] if lines else pieces


def chunk_documents(documents, max_words: int = 48) -> list[Passage]:
    """Passages of `documents` (strings), ids in document then reading order.

    Raises:
      RagError: no documents, max_words < 1, or no text in any document.
    """
    if max_words < 1:
        raise RagError(f"max_words={max_words} must be >= 1")
    passages = []
    for doc, text in enumerate(documents):
        title = text.strip().splitlines()[0] if text.strip() else ""
        current: list[str] = []
        for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
            for piece in _pieces(paragraph.strip(), max_words):
                if current and len(" ".join(current + [piece]).split()) > max_words:
                    passages.append(Passage(len(passages), doc, title, "\n\n".join(current)))
                    current = []
                if piece:
                    current.append(piece)
        if current:
            passages.append(Passage(len(passages), doc, title, "\n\n".join(current)))
    if not passages:
        raise RagError(f"the collection of {len(documents)} document(s) holds no text to retrieve")
    return passages


def load_passages(source="shakespeare", max_words: int = 48) -> list[Passage]:
    """Passages of a corpus: a bundled name ("shakespeare") or a .txt/.md file or folder
    (see `llmjax.data.load_corpus`; its CorpusError names a missing or empty source)."""
    return chunk_documents(load_corpus(source), max_words)
