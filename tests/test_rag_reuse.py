"""Document KV reuse: questions over the same retrieved passages share the passages' KV blocks
through the engine's prefix cache, prefill fewer tokens, and generate the same tokens."""
import jax
import pytest

from llmjax.config import load_config
from llmjax.data import ByteTokenizer, load_corpus
from llmjax.decode.engine import Engine, EngineConfig
from llmjax.models import init_model
from llmjax.rag import assemble_prompt, chunk_documents
from llmjax.rag.reuse import reuse_trace

ENGINE = EngineConfig(max_slots=1, prefill_slots=1, chunk_size=32, block_size=8, num_blocks=32)


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """IEEE fp32 dots (no TF32 on a GPU), so greedy tokens with and without reuse agree."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def setup():
    model = init_model(load_config(overrides=["preset=gpt2-tiny"]).model, seed=2)
    play = load_corpus("shakespeare")[0][:4000]
    return model, chunk_documents([play], max_words=6)


def test_second_question_prefills_only_its_own_tokens(setup):
    model, passages = setup
    tok, ids = ByteTokenizer(), [5, 6]
    prompts = [assemble_prompt(tok, passages, ids, q, 100)[0] for q in ("Who speaks?", "What moon?")]
    shared = len(assemble_prompt(tok, passages, ids, "", 100)[0]) - 1  # the passages' tokens
    assert shared >= 2 * ENGINE.block_size
    outputs = {}
    for caching in (False, True):
        engine = Engine(model, EngineConfig(**{**ENGINE.__dict__, "prefix_caching": caching}))
        requests = [engine.submit(p, 5) for p in prompts]
        seqs = [engine.run()[i] for i in requests]
        outputs[caching] = [s.generated for s in seqs]
        engine.allocator.check()
        computed = [len(p) - s.cached_tokens for p, s in zip(prompts, seqs)]
        if caching:  # every full block of the shared passages comes from the cache
            assert seqs[1].cached_tokens == shared // ENGINE.block_size * ENGINE.block_size
            assert computed[1] < computed[0]
        else:
            assert computed == [len(p) for p in prompts]
    assert outputs[True] == outputs[False]


def test_reuse_trace_counts_and_agrees(setup):
    model, passages = setup
    rows = reuse_trace(passages, model, ByteTokenizer(), groups=2, repeats=2, per_group=2, max_new_tokens=4,
                       engine_cfg=ENGINE)
    off, on = rows
    assert not off["prefix_caching"] and on["prefix_caching"]
    assert off["prefilled_tokens"] == off["prompt_tokens"] == on["prompt_tokens"]
    assert on["prefilled_tokens"] < off["prefilled_tokens"]
    assert on["same_tokens"] and off["same_tokens"]
