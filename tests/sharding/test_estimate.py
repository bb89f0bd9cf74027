"""The resource estimator: formulas printed, FLOPs and GPU time, the smallest fitting layout."""
import pytest

from experiments.estimate import infer_shape, layouts, main, pipeline_bubble, smallest_fitting, train_flops
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
    assert dense == pytest.approx(3.15e23, rel=0.01)


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
    assert "--mfu" in capsys.readouterr().err
