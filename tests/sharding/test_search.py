"""The layout search: enumeration counts, the memory prune, the cost model on paper, and the
`shard_sweep --auto` run on the 8-device CPU mesh (choice rule, rank correlation)."""
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.shard_sweep import format_auto, main
from llmjax.config import load_config
from sharding import search
from sharding.search import Hardware, Layout, enumerate_layouts, factorizations, predict

HW = Hardware(peak_flops=1e12, mfu=0.5, link_bytes_per_s=1e10, link_latency_s=1e-5, memory_bytes=1e12)


@dataclasses.dataclass(frozen=True)
class Model:
    """A model on paper whose sizes every split of 8 devices divides."""

    n_layers: int = 8
    d_model: int = 64
    n_heads: int = 8
    n_kv_heads: int = 8
    d_mlp: int = 256
    vocab_size: int = 512
    max_seq_len: int = 64
    family: str = "gpt2"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    loss_impl: str = "xla"


def _predict(preset, sizes, model=Model(), n_params=1e6, batch_size=64, layer_tensors=12, **kw):
    layout = Layout(preset, tuple(sizes.items()), **kw)
    return predict(layout, model, n_params, HW, batch_size=batch_size, grad_accum=1, seq_len=16,
                   layer_tensors=layer_tensors)


def test_factorizations_are_every_ordered_split():
    for n, k in ((8, 2), (8, 3), (12, 3), (1, 4)):
        got = factorizations(n, k)
        brute = [t for t in itertools.product(range(1, n + 1), repeat=k) if math.prod(t) == n]
        assert sorted(got) == sorted(brute)
    assert len(factorizations(8, 3)) == 10  # C(3+2, 2): exponents of 2 summing to 3


def test_enumeration_covers_factorizations_presets_and_remat():
    layouts = enumerate_layouts(Model(), 8, micro_batch=64, seq_len=16)
    counts = {p: sum(1 for x in layouts if x.preset == p) for p in search.PRESETS}
    # Meshes of 8 per preset (the defining axes > 1): dp 1; fsdp, zero1 (data x fsdp), tp, sp
    # (data x tensor): 3 each; fsdp_tp (data x fsdp x tensor, both > 1): 3; pp (data x
    # pipeline): 3 x 4 microbatch counts; pp_fsdp (fsdp x pipeline, both > 1): 2 x 4. Times 3 remats.
    assert counts == {"dp": 3, "fsdp": 9, "zero1": 9, "tp": 9, "sp": 9, "fsdp_tp": 9, "pp": 36, "pp_fsdp": 24}
    assert len(set(layouts)) == len(layouts)
    assert all(math.prod(x.mesh_shape.values()) == 8 for x in layouts)
    assert {x.remat for x in layouts} == set(search.REMATS)
    # The model's sizes prune the rest: 4 kv heads cannot split 8 ways, 2 layers not 4 stages.
    narrow = enumerate_layouts(dataclasses.replace(Model(), n_kv_heads=4, n_layers=2), 8, 64, 16,
                               remats=("none",))
    assert not [x for x in narrow if x.tensor == 8 or x.pipeline > 2]
    assert [x for x in narrow if x.tensor == 4] and [x for x in narrow if x.pipeline == 2]
    with pytest.raises(ValueError, match="unknown layout search choice 'zero3'"):
        enumerate_layouts(Model(), 8, 64, 16, presets=("zero3",))


def test_cost_model_ranks_sensibly_on_paper():
    # A tiny model: communication only costs, so more data parallelism is cheaper.
    dp = _predict("dp", {"data": 8})
    assert dp.step_s < _predict("tp", {"data": 4, "tensor": 2}).step_s < _predict("tp", {"data": 2, "tensor": 4}).step_s
    assert dp.step_s < _predict("fsdp", {"fsdp": 8}).step_s
    # A bigger bubble costs more: fewer microbatches, more stages.
    pp = {m: _predict("pp", {"data": 2, "pipeline": 4}, microbatches=m) for m in (1, 2, 8)}
    assert [pp[m].bubble for m in (1, 2, 8)] == pytest.approx([3 / 4, 3 / 5, 3 / 11])
    assert pp[1].step_s > pp[2].step_s > pp[8].step_s
    # Recompute costs time and saves activation memory.
    remat = {r: _predict("dp", {"data": 8}, remat=r) for r in search.REMATS}
    assert remat["none"].step_s < remat["dots"].step_s < remat["full"].step_s
    assert remat["none"].activation_bytes > remat["dots"].activation_bytes > remat["full"].activation_bytes
    # ZeRO: the states shrink as the preset splits more of them.
    states = [_predict(p, {"fsdp": 8} if p != "dp" else {"data": 8}).state_bytes for p in ("dp", "zero1", "fsdp")]
    assert states[0] > states[1] > states[2] == pytest.approx(states[0] / 8)


def test_cost_model_counts_collectives_and_shares_a_host():
    # fsdp gathers each weight tensor of each layer on its own, forward and backward: the
    # count, not the bytes, grows with the tensors per layer.
    few, many = (_predict("fsdp", {"fsdp": 8}, layer_tensors=k) for k in (4, 16))
    assert many.comm_ops - few.comm_ops == 2 * Model().n_layers * (16 - 4)
    assert many.comm_s > few.comm_s and many.comm_bytes == pytest.approx(few.comm_bytes)
    # Sequence parallel splits each tensor-parallel all-reduce into an all-gather and a
    # reduce-scatter: twice the collectives, the same bytes.
    tp, sp = _predict("tp", {"data": 2, "tensor": 4}), _predict("sp", {"data": 2, "tensor": 4})
    assert sp.comm_ops == tp.comm_ops + 4 * Model().n_layers
    assert sp.comm_bytes == pytest.approx(tp.comm_bytes)
    # A pipeline's bubble costs time on devices of their own; on virtual devices sharing a
    # host (one device alone runs 8x faster) the other devices fill it.
    pp = Layout("pp", (("data", 2), ("pipeline", 4)), microbatches=1)
    kw = {"batch_size": 64, "grad_accum": 1, "seq_len": 16}
    own = predict(pp, Model(), 1e6, HW, **kw)
    shared = predict(pp, Model(), 1e6, dataclasses.replace(HW, solo_flops=8 * HW.peak_flops), **kw)
    assert own.compute_s == pytest.approx(4 * shared.compute_s)  # bubble 3/4
    dp = predict(Layout("dp", (("data", 8),)), Model(), 1e6, HW, **kw)
    assert shared.compute_s == pytest.approx(dp.compute_s * 4 / 3)  # only the recomputed forward


def test_rank_correlation_and_choice_rule():
    assert search.rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert search.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert search.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(search.rank_correlation([1], [2]))
    assert math.isnan(search.rank_correlation([1, 1], [2, 3]))
    assert search.choose({"a": 0.3, "b": 0.1, "c": 0.2}) == "b"
    ranked = list(range(20))
    assert search.to_time(ranked, 3) == [0, 1, 2]
    assert search.to_time(ranked, 2, spread=3) == [0, 1, 2, 10, 19]  # the top, then across the rest
    assert search.to_time(ranked[:4], 3, spread=5) == [0, 1, 2, 3]


def test_prune_drops_only_what_cannot_fit():
    kw = {"batch_size": 64, "grad_accum": 1, "seq_len": 16, "remats": ("none",)}
    ranked, pruned = search.search(Model(), 1e6, 8, HW, **kw)
    assert ranked and not pruned
    dp = next(p for p in ranked if p.layout.preset == "dp")
    small = dataclasses.replace(HW, memory_bytes=dp.memory_bytes * 0.5)
    ranked, pruned = search.search(Model(), 1e6, 8, small, **kw)
    assert dp.layout in {p.layout for p in pruned}
    assert all(p.memory_bytes <= small.memory_bytes * (1 + search.PRUNE_SLACK) for p in ranked)


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """The search on the 8-device CPU mesh: the best on paper and one more from across the
    ranking (each timed row is a compile: two keep the suite short), timed in 2 interleaved
    rounds of one step (the timings' quality is the committed benchmark's business, not this
    test's). It runs as the command a user types, in a process of its own: under the
    persistent compilation cache this conftest turns on, the pp_fsdp CPU step reloaded from the
    cache hung in a collective's rendezvous until XLA aborted the process (jax 0.11.2)."""
    out = tmp_path_factory.mktemp("auto")
    argv = ["--auto", "--top", "1", "--spread", "1", "--steps", "1", "--rounds", "2", "--remats", "none,full",
            "preset=gpt2-tiny", "name=auto", f"out_dir={out}", "train.batch_size=8", "data.seq_len=16"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run([sys.executable, "-m", "experiments.shard_sweep", *argv], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "auto", json.loads((out / "auto" / "shard_search.json").read_text())


def test_auto_times_the_chosen_candidates_and_reports_them(auto_run):
    """What --auto promises about its own record: it times the best on paper and a spread
    one, names the measured fastest the winner, and reports the paper pick's ratio to it and
    the rank correlation of exactly the rows it timed. How well the cost model predicts the
    timings (the issue's >= 0.8 rank correlation, winner within 10% of the best) is a timing
    claim: it is shown by the committed benchmark (benchmarks/results/layout_search_cpu_*),
    not asserted here, where a shared 2-core CI host under load decides the order of layouts
    a few percent apart (one CI run measured 0.40 over 4 near-tied layouts)."""
    run_dir, record = auto_run
    rows, ranking = record["rows"], record["ranking"]
    names = [r["layout"] for r in ranking]
    assert [r["layout"] for r in rows] == search.to_time(names, 1, 1) and len(rows) == 2
    predicted = {r["layout"]: r["predicted_step_s"] for r in ranking}
    assert all(r["predicted_step_s"] == pytest.approx(predicted[r["layout"]]) for r in rows)
    best = min(r["step_s"] for r in rows)
    assert record["winner"] == next(r["layout"] for r in rows if r["step_s"] == best)
    assert record["paper_pick"] == names[0]
    assert record["paper_pick_vs_best"] == pytest.approx(rows[0]["step_s"] / best)
    # Over two rows Spearman's rho is +1 if the measured order is the predicted one, -1 if not,
    # and undefined (nan) if either pair ties (a CI run recorded nan: the two best on paper can tie).
    (p0, t0), (p1, t1) = ((r["predicted_step_s"], r["step_s"]) for r in rows)
    rho = math.nan if p0 == p1 or t0 == t1 else 1.0 if (p0 < p1) == (t0 < t1) else -1.0
    assert record["rank_correlation"] == pytest.approx(rho, nan_ok=True)
    assert (run_dir / "shard_search.png").stat().st_size > 0
    assert all(r["loss"] > 0 and r["compiled_bytes"] > 0 and r["collective_count"] >= 1 for r in rows)
    printed = format_auto(record)
    assert f"winner: {record['winner']}" in printed
    assert "rank correlation predicted vs measured over 2 timed" in printed


def test_auto_prune_keeps_every_layout_that_fits_by_its_compiled_memory(auto_run):
    """Any budget that a layout's compiled step fits (memory_analysis) never prunes it."""
    _, record = auto_run
    cfg = load_config(overrides=["preset=gpt2-tiny"])
    rows = record["rows"]
    for budget in sorted(r["compiled_bytes"] for r in rows):
        hw = dataclasses.replace(HW, memory_bytes=budget)
        ranked, _ = search.search(cfg.model, record["n_params"], 8, hw, batch_size=8, grad_accum=1, seq_len=16,
                                  remats=("none", "full"), schedule=cfg.mesh.pp_schedule)
        kept = {p.layout.name for p in ranked}
        assert {r["layout"] for r in rows if r["compiled_bytes"] <= budget} <= kept, budget


def test_auto_reports_when_nothing_fits(tmp_path, capsys):
    argv = ["--auto", "--memory-gb", "1e-6", "preset=gpt2-tiny", "name=none", f"out_dir={tmp_path}",
            "train.batch_size=8", "data.seq_len=16"]
    assert main(argv) == 2
    assert "no layout of 8 devices fits" in capsys.readouterr().err
