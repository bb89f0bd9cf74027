"""Tests for llmjax.data: corpus, tokenizers, windows, split, iterator, entropy."""
import json
import math

import numpy as np
import pytest
import tokenizers
from tokenizers import models

from experiments.build_corpus import play_to_text
from llmjax.data import (
    BatchIterator,
    CorpusError,
    TokenizerError,
    load_corpus,
    load_dataset,
    load_tokenizer,
    make_windows,
    tokenize_documents,
    train_bpe,
    train_val_windows,
    unigram_entropy,
)

SAMPLE = "HAMLET:\nTo be, or not to be—that is the question:\n  Whether 'tis nobler… ünïcödé 🎭\n\n"


# ---- corpus ----

def test_bundled_corpus_has_every_play_as_clean_text():
    docs = load_corpus("shakespeare")
    assert len(docs) == 38
    titles = [d.splitlines()[0] for d in docs]
    assert "Hamlet" in titles and "Measure for Measure" in titles and "Edward III" in titles
    hamlet = docs[titles.index("Hamlet")]
    assert "HAMLET:\nTo be, or not to be: that is the question:" in hamlet
    assert 4_500_000 < sum(map(len, docs)) < 5_500_000
    for d in docs:
        assert "**" not in d and "\f" not in d and "  \n" not in d and "\\" not in d


def test_play_to_text_strips_markdown():
    md = ("## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \n"
          "Who's there?  \nNay, __\\[Aside]_ \\--stand.\n\n*Exeunt, &amp; c.*\n")
    assert play_to_text(md, "Hamlet") == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO:\n"
        "Who's there?\nNay, [Aside] --stand.\n\nExeunt, & c.\n")
    assert play_to_text("# Hamlet\n\n**HAMLET**\nAy.\n", "ignored") == "Hamlet\n\nHAMLET:\nAy.\n"


def test_directory_corpus_is_recursive_sorted_and_text_only(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.txt").write_text("  \n")  # whitespace only: left out
    (tmp_path / "notes.py").write_text("not text")
    assert load_corpus(tmp_path) == ["first", "second"]
    assert load_corpus(str(tmp_path / "a.txt")) == ["first"]


def test_corpus_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="nope.txt"):
        load_corpus(str(missing))
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t\n")
    with pytest.raises(CorpusError, match="empty.txt.*empty"):
        load_corpus(empty)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\0")
    with pytest.raises(CorpusError, match=r"directory .*d has no"):
        load_corpus(tmp_path / "d")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt.*UTF-8"):
        load_corpus(bad)
    assert issubclass(CorpusError, ValueError)


# ---- tokenizers ----

def test_bundled_tokenizer_round_trips():
    tok = load_tokenizer("bundled")
    assert tok.vocab_size == 8192 and tok.eos_id == 0
    hamlet = next(d for d in load_corpus("shakespeare") if d.startswith("Hamlet\n"))
    for text in [SAMPLE, hamlet[:5000], "  spaces  \n\n\ttabs"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    passage = hamlet[:5000]
    assert len(tok.encode(passage)) < len(passage.encode()) / 2.5  # BPE compresses Shakespeare
    assert tok.encode_batch([SAMPLE, passage]) == [tok.encode(SAMPLE), tok.encode(passage)]


def test_bytes_tokenizer_round_trips_and_tolerates_bad_utf8():
    tok = load_tokenizer("bytes")
    assert tok.vocab_size == 257 and tok.eos_id == 256
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and tok.decode(ids) == SAMPLE
    assert tok.decode([104, 105, 256, 0xE2, 0x80]) == "hi\ufffd"  # EOS dropped, cut char replaced
    with pytest.raises(ValueError, match="id 300"):
        tok.decode([300])


def test_hf_tokenizer_json_saved_and_loaded(tmp_path):
    text = load_corpus("shakespeare")[0][:20_000]
    trained = train_bpe([text], vocab_size=300)
    assert trained.vocab_size == 300 and trained.eos_id == 0
    trained.save(tmp_path / "tokenizer.json")
    for spec in [str(tmp_path / "tokenizer.json"), tmp_path]:  # the file, or its folder
        tok = load_tokenizer(spec)
        assert tok.vocab_size == 300 and tok.eos_id == 0
        assert tok.encode(text) == trained.encode(text)
        assert tok.decode(tok.encode(text + SAMPLE)) == text + SAMPLE
    assert len(trained.encode(text)) < 0.8 * len(text)  # 44 merges already compress
    assert train_bpe([text], vocab_size=300).encode(text) == trained.encode(text)  # deterministic
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe([text], vocab_size=100)


def test_tokenizer_json_without_eos_loads_but_cannot_separate_documents(tmp_path):
    hf = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id is None and tok.vocab_size == 2
    with pytest.raises(ValueError, match="no EOS"):
        tokenize_documents(["a"], tok)


def test_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="'gpt2'.*no such file"):
        load_tokenizer("gpt2")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json.*not a valid"):
        load_tokenizer(bad)


# ---- tokens, windows, split ----

def test_tokenize_documents_puts_eos_after_each_document():
    tok = load_tokenizer("bytes")
    tokens = tokenize_documents(["ab", "", "c"], tok)
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [97, 98, 256, 256, 99, 256]


def test_windows_targets_are_inputs_shifted_by_one():
    tokens = np.arange(1000, dtype=np.int32)
    w = make_windows(tokens, seq_len=16)
    assert w.shape == ((1000 - 1) // 16, 17)
    inputs, targets = w[:, :-1], w[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(w[:, 0], np.arange(len(w)) * 16)  # stride seq_len


def test_train_val_are_disjoint_and_cover_the_stream():
    tokens = np.arange(10_001, dtype=np.int32)  # token value = stream position
    train, val = train_val_windows(tokens, seq_len=10, val_fraction=0.1)
    assert train.shape == (900, 11) and val.shape == (100, 11) and train.dtype == np.int32
    train_targets, val_targets = set(train[:, 1:].ravel()), set(val[:, 1:].ravel())
    assert not train_targets & val_targets
    assert train_targets | val_targets == set(range(1, 10_001))
    assert val[0, 0] == 90 and val[-1, 0] == 9990  # every 10th window, spread over the corpus


def test_corpus_too_short_names_seq_len_and_tokens():
    with pytest.raises(ValueError, match=r"100 tokens.*seq_len=64"):
        train_val_windows(np.zeros(100, np.int32), seq_len=64, val_fraction=0.1)
    with pytest.raises(ValueError, match="val_fraction=0.7"):
        train_val_windows(np.zeros(100, np.int32), seq_len=4, val_fraction=0.7)


def test_load_dataset_bundled():
    ds = load_dataset("shakespeare", "bundled", seq_len=256, val_fraction=0.05)
    assert ds.seq_len == 256 and ds.train.shape[1] == ds.val.shape[1] == 257
    n = len(ds.train) + len(ds.val)
    assert n == (1_477_589 - 1) // 256 and len(ds.val) == n // 20
    assert 6.0 < ds.unigram_entropy < 6.6  # nats/token, context-free baseline
    assert ds.train.max() < ds.tokenizer.vocab_size


def test_load_dataset_too_short_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("To be, or not to be.")
    with pytest.raises(ValueError, match=r"21 tokens.*seq_len=32"):
        load_dataset(str(tmp_path / "tiny.txt"), "bytes", seq_len=32, val_fraction=0.1)


# ---- batch iterator ----

def _windows(n=10, width=5):
    return np.arange(n * width, dtype=np.int32).reshape(n, width)


def test_iterator_is_deterministic_and_permutes_each_epoch():
    w = _windows()
    a, b = BatchIterator(w, batch_size=3, seed=7), BatchIterator(w, batch_size=3, seed=7)
    batches = [next(a) for _ in range(9)]  # 3 epochs of 3 batches (1 window dropped each)
    assert all(x.shape == (3, 5) and x.dtype == np.int32 for x in batches)
    assert all(np.array_equal(x, next(b)) for x in batches)
    for e in range(3):
        firsts = np.concatenate(batches[3 * e:3 * e + 3])[:, 0]
        assert len(set(firsts)) == 9  # no window twice in an epoch
    assert not np.array_equal(np.stack(batches[:3]), np.stack(batches[3:6]))  # new order per epoch
    c = BatchIterator(w, batch_size=3, seed=8)
    assert not all(np.array_equal(x, next(c)) for x in batches[:3])


@pytest.mark.parametrize("taken", [2, 3, 4])  # mid-epoch, at the boundary, past it
def test_iterator_restored_from_state_yields_the_same_batches(taken):
    w = _windows()
    it = BatchIterator(w, batch_size=3, seed=1)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(it.state()))
    assert state["epoch"] == taken // 3 and state["index"] == taken % 3
    expected = [next(it) for _ in range(5)]
    restored = BatchIterator(w, batch_size=3, seed=1)
    restored.restore(state)
    assert all(np.array_equal(x, next(restored)) for x in expected)
    from_state = BatchIterator.from_state(w, state)
    assert all(np.array_equal(x, next(from_state)) for x in expected)


def test_iterator_errors():
    with pytest.raises(ValueError, match=r"batch_size=11.*\[1, 10\]"):
        BatchIterator(_windows(), batch_size=11, seed=0)
    state = BatchIterator(_windows(), batch_size=3, seed=0).state()
    with pytest.raises(ValueError, match="n_windows=10.*n_windows=12"):
        BatchIterator(_windows(12), batch_size=3, seed=0).restore(state)
    with pytest.raises(ValueError, match="seed=0.*seed=5"):
        BatchIterator(_windows(), batch_size=3, seed=5).restore(state)


# ---- unigram entropy ----

def test_unigram_entropy_of_known_distributions():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 25)) == pytest.approx(math.log(4))
    p = np.array([0.75, 0.25])
    assert unigram_entropy(np.array([5, 5, 5, 9])) == pytest.approx(-(p * np.log(p)).sum())
    assert unigram_entropy(np.full((3, 4), 7)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy(np.array([], np.int32))
