"""RAG: passages, BM25 against a hand-computed case and on generated questions, the exact dense
index, prompt assembly within the context, and the pipeline end to end through the engine."""
import math

import numpy as np
import pytest

from llmjax.config import load_config
from llmjax.data import ByteTokenizer
from llmjax.decode.engine import Engine, EngineConfig
from llmjax.models import init_model
from llmjax.rag import (
    BM25,
    DenseIndex,
    Passage,
    RagError,
    RagPipeline,
    assemble_prompt,
    chunk_documents,
    embed_texts,
    fragment_questions,
    load_passages,
    make_retriever,
    recall_at_k,
)

DOCS = [("Title one\n\nROMEO:\nBut soft, what light through yonder window breaks?\n\n"
         "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\nExit"),
        "Title two\n\nHAMLET:\nTo be, or not to be, that is the question:\nWhether tis nobler in the mind"]


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(load_config(overrides=["preset=gpt2-tiny"]).model, seed=3)


def test_chunking_keeps_documents_apart_and_sizes():
    passages = chunk_documents(DOCS, max_words=10)
    assert [p.id for p in passages] == list(range(len(passages)))
    assert {p.doc for p in passages} == {0, 1}
    assert all(len(p.text.split()) <= 10 for p in passages)
    assert passages[0].title == "Title one" and passages[-1].title == "Title two"
    # every word of a document is in its passages, in order
    for doc, text in enumerate(DOCS):
        assert " ".join(p.text for p in passages if p.doc == doc).split() == text.split()


def test_empty_collection_and_bad_size_raise():
    with pytest.raises(RagError, match="holds no text"):
        chunk_documents(["  \n\n ", ""])
    with pytest.raises(RagError, match="max_words=0"):
        chunk_documents(DOCS, max_words=0)
    with pytest.raises(RagError, match="empty"):
        make_retriever("bm25", [])
    with pytest.raises(RagError, match="retriever='tfidf'"):
        make_retriever("tfidf", chunk_documents(DOCS))


def test_bm25_matches_hand_computed_scores():
    bm25 = BM25(["a b", "a c c", "d"], k1=1.5, b=0.75)  # lengths 2, 3, 1; avgdl 2
    idf_a, idf_c = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5)), math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    norm = [1.5 * (1 - 0.75 + 0.75 * n / 2) for n in (2, 3, 1)]
    expected = [idf_a * 1 * 2.5 / (1 + norm[0]),
                idf_a * 1 * 2.5 / (1 + norm[1]) + idf_c * 2 * 2.5 / (2 + norm[1]), 0.0]
    np.testing.assert_allclose(bm25.scores("A c"), expected, rtol=1e-12)
    np.testing.assert_allclose(expected[:2], [0.470004, 1.590851], atol=1e-6)  # by hand
    scores, ids = bm25.search("a c", 2)
    assert ids.tolist() == [1, 0] and scores[0] > scores[1]


def test_bm25_recall_on_generated_questions():
    """Measured on the bundled plays (23,634 passages of <= 48 words): recall@5 0.995, @1 0.955
    over 200 questions; asserted with a margin over 100 questions."""
    passages = load_passages("shakespeare", max_words=48)
    questions = fragment_questions(passages, 100, seed=1)
    assert all(q in " ".join(passages[i].text.split()) for q, rel in questions for i in rel)
    assert recall_at_k(make_retriever("bm25", passages), questions, 5) >= 0.95


def test_dense_index_returns_exact_top_k():
    rng = np.random.default_rng(0)
    vectors, queries = rng.normal(size=(300, 16)), rng.normal(size=(5, 16))
    index = DenseIndex(vectors, whiten=False)
    scores, ids = index.search(queries, 7)
    unit = lambda x: (x - vectors.mean(0)) / np.linalg.norm(x - vectors.mean(0), axis=-1, keepdims=True)  # noqa: E731
    cosines = unit(queries) @ unit(vectors).T
    np.testing.assert_array_equal(ids, np.argsort(-cosines, axis=1)[:, :7])
    np.testing.assert_allclose(scores, np.take_along_axis(cosines, ids, axis=1), atol=1e-5)


def test_whitening_maps_the_collection_covariance_to_identity():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 3.0  # correlated, off-center
    index = DenseIndex(vectors)
    whitened = (vectors - index.center) @ index.transform
    np.testing.assert_allclose(np.cov(whitened.T), np.eye(6), atol=1e-3)
    scores, ids = index.search(vectors[:4], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_dense_index_save_load_and_missing(tmp_path):
    index = DenseIndex(np.random.default_rng(1).normal(size=(20, 8)))
    index.save(tmp_path / "index.npz")
    loaded = DenseIndex.load(tmp_path / "index.npz")
    np.testing.assert_array_equal(loaded.search(np.ones(8), 3)[1], index.search(np.ones(8), 3)[1])
    with pytest.raises(RagError, match="no dense index at .*missing.npz"):
        DenseIndex.load(tmp_path / "missing.npz")


def test_embed_retriever_finds_a_passage_by_its_own_text(tiny_model):
    passages = chunk_documents(DOCS, max_words=10)
    vectors = embed_texts(tiny_model, ByteTokenizer(), [p.text for p in passages], batch_size=8)
    assert vectors.shape == (len(passages), tiny_model.cfg.d_model)
    retrieve = make_retriever("embed", passages, tiny_model, ByteTokenizer(), DenseIndex(vectors))
    for p in passages:
        assert retrieve(p.text, 1)[1][0] == p.id
    with pytest.raises(RagError, match="index holds 2 vectors"):
        make_retriever("embed", passages, tiny_model, ByteTokenizer(), DenseIndex(vectors[:2]))


def test_prompt_assembly_respects_the_budget():
    tok = ByteTokenizer()
    passages = [Passage(i, 0, "t", text) for i, text in enumerate(["x" * 30, "y" * 10, "z" * 50, "w" * 5])]
    question = "why?"  # 5 tokens with its newline
    tokens, used = assemble_prompt(tok, passages, [2, 0, 1, 3], question, budget=60)
    assert len(tokens) <= 60
    # room 55: passage 2 (52 tokens with its separator) fits; 0 (32), 1 (12), 3 (7) then do not
    assert used == [2] and tok.decode(tokens) == "z" * 50 + "\n\nwhy?\n"
    tokens, used = assemble_prompt(tok, passages, [3, 1], question, budget=100)
    assert tok.decode(tokens) == "y" * 10 + "\n\n" + "w" * 5 + "\n\nwhy?\n" and used == [1, 3]
    with pytest.raises(RagError, match="question is 5 tokens, longer than the context budget of 4"):
        assemble_prompt(tok, passages, [0], question, budget=4)


def test_pipeline_answers_within_the_context(tiny_model):
    passages = chunk_documents(DOCS, max_words=10)
    engine = Engine(tiny_model, EngineConfig(max_slots=1, prefill_slots=1, chunk_size=32, block_size=8,
                                             num_blocks=16))
    pipeline = RagPipeline(passages, ByteTokenizer(), engine, make_retriever("bm25", passages),
                           max_new_tokens=6)
    answer = pipeline.answer("wherefore art thou Romeo", k=3)
    assert "wherefore" in answer.hits[0][0].text
    assert answer.used and set(answer.used) <= {p.id for p, _ in answer.hits}
    assert answer.prompt_tokens <= engine.context - 6 and answer.ttft_s > 0
    with pytest.raises(RagError, match="longer than the context budget"):
        pipeline.answer("x" * 200)
    with pytest.raises(RagError, match="question is empty"):
        pipeline.answer("  ")


@pytest.mark.parametrize("argv, named", [(["--eval", "--questions", "0"], "--questions 0"),
                                         (["--query", "who", "--k", "0"], "--k 0"),
                                         (["--kv", "--windows", "0", "--reps", "0"], "--windows 0, --reps 0")])
def test_cli_counts_below_one_are_named(argv, named, capsys):
    from experiments import rag as rag_cli
    with pytest.raises(SystemExit):
        rag_cli.main(argv)
    assert f"{named}: counts must be >= 1" in capsys.readouterr().err
