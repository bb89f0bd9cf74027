"""The resource estimator: formulas printed, FLOPs and GPU time, the smallest fitting layout."""
import dataclasses
import re

import pytest

from experiments.estimate import (GPT3, PaperModel, infer_shape, layouts, main, pipeline_bubble, smallest_fitting,
                                  train_flops)
from sharding import search
from sharding.pipeline import schedule_stats


def test_prints_the_zero3_formula_and_an_answer(capsys):
    assert main(["--params", "100e9", "--tokens", "2e12", "--gpu", "h100", "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    assert "(2+2+12)Ψ/N" in out and "6·Ψ·D + 12·L·d·T·D" in out
    assert "stage 3: (2+2+12)Ψ/N          =      1.6 GB at N=1024" in out  # 16 B x 1e11 / 1024
    assert "smallest layout that fits: ZeRO-3, tensor=1, pipeline=1, data=1024" in out
    assert "(p-1)/(m+p-1)" in out


@pytest.mark.parametrize("p,m", [(1, 16), (4, 16), (8, 4)])
def test_bubble_formula_is_what_the_schedules_execute(p, m):
    for schedule in ("gpipe", "1f1b"):
        assert pipeline_bubble(p, m) == pytest.approx(schedule_stats(schedule, p, m)["bubble"])


def test_flops_and_gpu_hours():
    shape = infer_shape(175e9)
    assert (shape.n_layers, shape.d_model) == (96, 12288)  # GPT-3's shape comes back
    dense, attn = train_flops(shape, 300e9, 2048)
    assert dense == 6 * 175e9 * 300e9
    assert attn == 12 * 96 * 12288 * 2048 * 300e9
    # GPT-3 175B: ~3.14e23 FLOPs (Brown et al. 2020, table D.1) for the dense part.
    assert dense == pytest.approx(3.14e23, rel=0.01)


def test_smallest_layout_prefers_less_model_parallelism():
    shape = infer_shape(7e9, n_layers=32, d_model=4096)
    rows = layouts(shape, gpus=8, seq_len=4096, micro_batch=1, recompute=True)
    pick = lambda memory: (lambda r: (r.stage, r.tensor, r.pipeline, r.data))(  # noqa: E731
        smallest_fitting(rows, memory))
    # States 7e9 x (4 + 12/8) = 38.5 GB under ZeRO-1, x (2 + 14/8) = 26.25 GB under ZeRO-2,
    # plus 1.6 GB of activations: data parallel over 8 wins over any tensor/pipeline split.
    assert pick(72e9) == (1, 1, 1, 8)
    assert pick(30e9) == (2, 1, 1, 8)
    assert smallest_fitting(rows, memory=1e9) is None


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(["--params", "1e9", "--tokens", "1e9", "--mfu", "1.5"])
    assert "--mfu 1.5:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # zero and NaN sizes are named, not defaulted or divided by
        main(["--params", "1e9", "--tokens", "nan", "--d-model", "0", "--seq-len", "0"])
    assert "--tokens nan, --seq-len 0, --d-model 0:" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(GPT3))
def test_gpt3_table_matches_its_parameter_counts(name):
    n_params, layers, d_model, heads, batch = GPT3[name]
    # 12·L·d² (blocks) + vocab·d (tied embedding) + 2048·d (positions): within 5% of the
    # paper's rounded counts, so a mistyped shape shows.
    assert 12 * layers * d_model ** 2 + (50257 + 2048) * d_model == pytest.approx(n_params, rel=0.05)
    assert d_model % heads == 0 and batch % 256 == 0


def test_gpt3_175b_on_1024_gpus_runs_the_layout_search(capsys):
    assert main(["--model", "gpt3-175b", "--gpus", "1024"]) == 0
    out = capsys.readouterr().out
    assert "model: Ψ=1.75e+11 params, L=96, d=12288, heads=96, T=2048; D=3e+11 tokens" in out
    assert "layout search (sharding.search) for a batch of 1536 x 2048 tokens" in out
    best = re.search(r"best on paper: (\S+) (\S+) remat=(\w+): ([\d.]+) s/step", out)
    assert best, out
    row = re.search(re.escape(f"{best.group(1)} {best.group(2)} remat={best.group(3)}") + r" .* ([\d.]+)$", out, re.M)
    assert float(row.group(1)) <= 80 * 0.9  # GB per device within the usable memory
    # The step can be no faster than its FLOPs at the given MFU on 1024 H100s.
    floor = 6 * 175e9 * 1536 * 2048 / (1024 * 989e12 * 0.4)
    assert float(best.group(4)) > floor


def test_paper_search_prunes_what_cannot_fit_and_prefers_data_parallel_when_it_fits():
    model = PaperModel(n_layers=12, d_model=768, n_heads=12, max_seq_len=2048)
    hw = search.Hardware(989e12, 0.4, 50e9, 1e-5, memory_bytes=80e9)
    ranked, pruned = search.search(model, 125e6, 8, hw, batch_size=64, grad_accum=8, seq_len=2048,
                                   remats=("full",), max_tensor=8)
    assert ranked[0].layout.preset in ("dp", "zero1", "fsdp") and not pruned  # 125M fits anywhere
    tight = dataclasses.replace(hw, memory_bytes=0.5e9)
    ranked, pruned = search.search(model, 125e6, 8, tight, batch_size=64, grad_accum=8, seq_len=2048,
                                   remats=("full",), max_tensor=8)
    assert pruned and all(p.memory_bytes <= 0.5e9 * (1 + search.PRUNE_SLACK) for p in ranked)
    assert "dp" not in {p.layout.preset for p in ranked}  # 125M x 16 B of states per device = 2 GB


def test_model_or_params_required(capsys):
    with pytest.raises(SystemExit):
        main(["--tokens", "1e9"])
    assert "give --model, or --params and --tokens" in capsys.readouterr().err
