"""The continuous-batching engine: every request of a mixed trace equals one-at-a-time greedy
`generate`, with and without prefix caching and with forced preemption; bad requests rejected
while the others are served."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import DecodeConfig, load_config
from llmjax.decode import generate
from llmjax.decode.engine import Engine, EngineConfig, RequestError, sample_rows
from llmjax.models import init_model

# One shape for every engine here (4 slots, 16-token chunks, a 16-block pool of 8 positions:
# exactly one max_seq_len=128 sequence), so the engine compiles twice for the whole module.
CFG = EngineConfig(max_slots=4, block_size=8, num_blocks=16, chunk_size=16)
REFERENCE_NEW_TOKENS = 10


@dataclasses.dataclass(frozen=True)
class Req:
    arrival_step: int
    prompt: tuple
    max_new_tokens: int
    stop_at: int | None = None  # stop on the reference's token at this index
    sampling: tuple = (("temperature", 0.0),)


def _prompts():
    rng = np.random.default_rng(0)
    shared = tuple(rng.integers(0, 512, 16).tolist())  # two blocks every "P+" prompt shares
    draw = lambda n: tuple(rng.integers(0, 512, n).tolist())  # noqa: E731
    return shared, draw


SHARED, _DRAW = _prompts()
LIGHT = (  # at most 31 positions (4 blocks) each: 4 slots fit the pool, no preemption
    Req(0, SHARED + _DRAW(5), 10), Req(0, _DRAW(6), 4), Req(0, SHARED + _DRAW(5), 7),
    Req(1, _DRAW(6), 10, stop_at=2), Req(3, SHARED + _DRAW(5), 10), Req(5, _DRAW(6), 7),
)
HEAVY = (  # 45-token prompts (7 blocks with their outputs): 4 of them cannot share 16 blocks
    Req(0, SHARED + _DRAW(29), 10), Req(0, SHARED + _DRAW(29), 10), Req(0, _DRAW(45), 9),
    Req(0, SHARED + _DRAW(5), 10), Req(2, SHARED + _DRAW(29), 6, stop_at=4), Req(2, _DRAW(6), 10),
    Req(4, _DRAW(21), 8, sampling=(("temperature", 0.9), ("top_k", 50), ("top_p", 0.9), ("seed", 5))),
)


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """IEEE fp32 dots everywhere (a GPU would otherwise use TF32 in XLA's dots but not in the
    decode kernel), so greedy ties break alike in the engine and in `generate`."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def model():
    return init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=1)


@pytest.fixture(scope="module")
def greedy(model):
    """One-at-a-time greedy generation of REFERENCE_NEW_TOKENS per prompt (a request with
    fewer new tokens is a prefix of it)."""
    cache = {}

    def continuation(prompt):
        if prompt not in cache:
            out = generate(model, jnp.asarray([prompt], jnp.int32),
                           DecodeConfig(max_new_tokens=REFERENCE_NEW_TOKENS, temperature=0.0))
            cache[prompt] = np.asarray(out)[0, len(prompt):].tolist()
        return cache[prompt]
    return continuation


def run_trace(engine, trace, greedy):
    """Submit each request at its arrival step (its stop token: the greedy reference's token at
    stop_at), step until done, checking the allocator after every step. Returns the finished
    sequences in trace order."""
    ids, step = {}, 0
    while len(ids) < len(trace) or engine.has_work():
        for i, req in enumerate(trace):
            if req.arrival_step == step:
                stop = () if req.stop_at is None else (greedy(req.prompt)[req.stop_at],)
                ids[i] = engine.submit(list(req.prompt), req.max_new_tokens, dict(req.sampling), stop)
        engine.step()
        engine.allocator.check()
        _check_kv_usage(engine)
        step += 1
    assert engine.allocator.num_used() == 0 and engine.allocator.num_available() == CFG.num_blocks
    return [engine.finished[ids[i]] for i in range(len(trace))]


def _check_kv_usage(engine):
    """kv_usage against a count of every written slot (shared blocks once); each running
    sequence leaves less than one block empty."""
    bs, filled = CFG.block_size, {}
    for seq in engine.running:
        for i, block in enumerate(seq.blocks):
            filled[block] = max(filled.get(block, 0), min(bs, max(0, seq.num_computed - i * bs)))
    usage = engine.kv_usage()
    assert usage["live"] == sum(filled.values()), usage
    assert usage["allocated"] == len(filled) * bs
    assert usage["allocated"] - usage["live"] < max(1, usage["running"]) * bs, usage


def expected_tokens(req, reference):
    tokens = reference[:req.max_new_tokens]
    if req.stop_at is not None:  # the first occurrence of the stop token ends the sequence
        tokens = tokens[:tokens.index(reference[req.stop_at]) + 1]
    return tokens


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix_cache", "no_prefix_cache"])
@pytest.mark.parametrize("trace_name", ["light", "heavy_preempting"])
def test_engine_equals_one_at_a_time_greedy(model, greedy, trace_name, prefix_caching):
    trace = LIGHT if trace_name == "light" else HEAVY
    engine = Engine(model, dataclasses.replace(CFG, prefix_caching=prefix_caching))
    done = run_trace(engine, trace, greedy)
    for i, (req, seq) in enumerate(zip(trace, done)):
        if dict(req.sampling)["temperature"] > 0:
            continue  # checked in test_sampled_request_is_independent_of_batching
        assert seq.generated == expected_tokens(req, greedy(req.prompt)), f"request {i}"
        assert seq.finish_reason == ("stop" if req.stop_at is not None else "length")
    preemptions = sum(s.preemptions for s in done)
    assert (preemptions > 0) == (trace_name == "heavy_preempting"), preemptions
    cached = sum(s.cached_tokens for s in done)
    assert (cached > 0) == prefix_caching, cached
    assert engine.steps < sum(len(s.generated) for s in done), "requests shared steps"


def test_long_prompt_does_not_stall_decoding(model, greedy):
    """Chunked prefill: while a 45-token prompt enters 16 tokens a step, a decoding request
    still gains one token every step."""
    engine = Engine(model, CFG)
    decoding = engine.submit(list(LIGHT[1].prompt), 10, {"temperature": 0.0})
    engine.step()
    long_prompt = engine.submit(list(HEAVY[2].prompt), 3, {"temperature": 0.0})
    engine.step()  # admits the long prompt: its first chunk
    by_id = {seq.id: seq for seq in engine.running}
    counts = [len(by_id[decoding].generated)]
    while not by_id[long_prompt].generated:  # until the long prompt's first token
        engine.step()
        counts.append(len(by_id[decoding].generated))
    assert counts == [2, 3, 4], counts  # ceil(45 / 16) = 3 steps, one new token each
    finished = engine.run()
    assert finished[decoding].generated == greedy(LIGHT[1].prompt)[:10]
    assert finished[long_prompt].generated == greedy(HEAVY[2].prompt)[:3]


def test_sampled_request_is_independent_of_batching(model, greedy):
    """A sampled request's tokens depend on its seed only: alone, or inside the preempting
    heavy trace, it draws the same tokens."""
    req = HEAVY[-1]
    alone = Engine(model, CFG)
    rid = alone.submit(list(req.prompt), req.max_new_tokens, dict(req.sampling))
    alone.run()
    busy = Engine(model, CFG)
    done = run_trace(busy, HEAVY, greedy)
    assert sum(s.preemptions for s in done) > 0
    assert done[-1].generated == alone.finished[rid].generated
    assert done[-1].generated != greedy(req.prompt)[:req.max_new_tokens]  # it did sample


def test_bad_requests_are_rejected_while_serving(model, greedy):
    engine = Engine(model, CFG)
    good = [engine.submit(list(LIGHT[0].prompt), 5, {"temperature": 0.0})]
    engine.step()
    bad = [
        (([], 5, None), "prompt is empty"),
        (([1, 2], 0, None), "max_new_tokens=0 must be an int >= 1"),
        (([1] * 125, 10, None), "prompt length 125 \\+ max_new_tokens=10 exceeds the context of 128"),
        (([1, 2], 5, {"temprature": 0.5}), r"unknown sampling option\(s\) \['temprature'\]"),
        (([1, 2], 5, {"top_p": 1.5}), "decode.top_p"),
        (([1, 600], 5, None), r"token ids must be in \[0, 512\)"),
        ((["a"], 5, None), "must be 1-D lists of integer token ids"),
        (([1.7, 2.9], 5, None), r"integer token ids; got \{'prompt': 'float64\[2\]'\}"),  # not truncated
        (([[1, 2], [3, 4]], 5, None), r"got \{'prompt': 'int64\[2, 2\]'\}"),  # not flattened
        (([1, 2], True, None), "max_new_tokens=True must be an int >= 1"),
        (([1, 2], 5, {"seed": 2**40}), r"seed=1099511627776 must be < 2\*\*31"),
        (([1, 2], 5, {"top_k": 2**31}), r"top_k=2147483648 must be < 2\*\*31"),  # would overflow int32 in a step
        (([1, 2], 5, {"top_k": 2.5}), r"decode.top_k=2.5.*an integer"),
        (([1, 2], 5, {"temperature": float("nan")}), r"decode.temperature=nan.*a finite number"),
        (([1, 2], 5, {"seed": None}), r"decode.seed=None.*an integer"),
    ]
    for (prompt, n, sampling), match in bad:
        with pytest.raises(RequestError, match=match):
            engine.submit(prompt, n, sampling)
        engine.step()
    with pytest.raises(RequestError, match=r"got \{'stop_tokens': 'float64\[1\]'\}"):
        engine.submit([1, 2], 5, stop_tokens=[3.9])
    with pytest.raises(RequestError, match="integer token ids: 'int' object is not iterable"):
        engine.submit([1, 2], 5, stop_tokens=3)
    good.append(engine.submit(list(LIGHT[1].prompt), 4, {"temperature": 0.0}))
    engine.run()
    assert sorted(engine.finished) == sorted(good)
    for rid, req in zip(good, (LIGHT[0], LIGHT[1])):
        n = 5 if rid == good[0] else 4
        assert engine.finished[rid].generated == greedy(req.prompt)[:n]


def test_admission_reserves_the_blocks_of_the_requests_it_admits(model):
    """Requests admitted in one step are counted against the free blocks together: one that
    would not fit beside those admitted before it waits, rather than being admitted and then
    preempted before it computed anything."""
    engine = Engine(model, dataclasses.replace(CFG, prefix_caching=False))
    engine.submit(list(range(100)), 10, {"temperature": 0.0})  # 13 of the 16 blocks
    while not engine.running or engine.running[0].num_computed < 100:
        engine.step()
    assert engine.allocator.num_available() == 3
    engine.submit(list(range(200, 216)), 2, {"temperature": 0.0})  # 2 blocks each
    engine.submit(list(range(300, 316)), 2, {"temperature": 0.0})
    engine.step()
    assert [s.preemptions for s in engine.running] == [0, 0] and len(engine.running) == 2
    assert [(s.preemptions, s.num_computed) for s in engine.waiting] == [(0, 0)]
    engine.run()
    assert len(engine.finished) == 3 and engine.allocator.num_available() == 16


def test_engine_config_rejects_a_pool_smaller_than_one_sequence(model):
    with pytest.raises(ValueError, match="num_blocks=4 must be >= 16"):
        Engine(model, dataclasses.replace(CFG, num_blocks=4))
    with pytest.raises(ValueError, match="EngineConfig.chunk_size=0"):
        EngineConfig(chunk_size=0)


def test_sample_rows_filters():
    """Per-row options: temperature 0, top_k 1 and a tiny top_p are greedy; top_k 3 draws only
    from each row's 3 largest logits."""
    logits = jax.random.normal(jax.random.key(0), (4, 64)) * 3
    keys = jax.random.split(jax.random.key(1), 4)
    greedy = np.asarray(jnp.argmax(logits, -1))
    fn = jax.jit(sample_rows)
    out = fn(logits, keys, jnp.array([0.0, 1.0, 1.0, 1.0]), jnp.array([0, 1, 0, 3]),
             jnp.array([1.0, 1.0, 1e-6, 1.0]))
    np.testing.assert_array_equal(np.asarray(out)[:3], greedy[:3])
    # The smallest normal-range temperature over logits of ~1000: unshifted, they would overflow to inf.
    tiny = fn(logits * 300, keys, jnp.full(4, 1e-37), jnp.zeros(4, jnp.int32), jnp.full(4, 0.5))
    np.testing.assert_array_equal(tiny, greedy)
    top3 = np.argsort(-np.asarray(logits[3]))[:3]
    draws = {int(fn(logits, jax.random.split(jax.random.key(i), 4), jnp.ones(4), jnp.full(4, 3),
                    jnp.ones(4))[3]) for i in range(30)}
    assert draws <= set(top3.tolist()) and len(draws) > 1


def test_serve_bench_writes_its_rows_json_and_plot(tmp_path, capsys):
    """`python -m experiments.serve_bench` on a tiny trace: both variants serve every request,
    and the record holds the percentiles (ordered) and the paged vs contiguous KV waste."""
    from experiments import serve_bench
    argv = ["--requests", "6", "--rate", "50", "--max-seq-len", "64", "--prompt-len", "4", "12", "--output-len", "2",
            "6", "--prefix-len", "8", "--prefixes", "2", "--slots", "4", "--block-size", "4", "--num-blocks", "64",
            "--chunk-size", "8", "--out", str(tmp_path)]
    assert serve_bench.main(argv) == 0
    (path,) = tmp_path.glob("serve_bench-llama-tiny_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["prefix_cache", "no_prefix_cache"]
    for r in rows:
        assert r["requests"] == 6 and r["output_tok_per_s"] > 0
        assert r["ttft_p50_ms"] <= r["ttft_p90_ms"] <= r["ttft_p99_ms"]
        assert r["tpot_p50_ms"] <= r["tpot_p90_ms"] <= r["tpot_p99_ms"]
        assert 0 <= r["kv_waste_paged"] < r["kv_waste_contiguous"] < 1
    assert path.with_suffix(".png").stat().st_size > 0
    assert serve_bench.main(argv[:-2] + ["--slots", "0", "--out", str(tmp_path)]) == 2  # a bad engine config
    for wrong, named in ((["--rate", "nan"], "--rate nan"), (["--requests", "0"], "--requests 0"),
                         (["--prompt-len", "16", "8"], "--prompt-len [16, 8]"), (["preset=gpt2-tiny"], "--preset")):
        with pytest.raises(SystemExit):  # argparse's exit 2, with the value named
            serve_bench.main(argv + wrong)
        assert named in capsys.readouterr().err
