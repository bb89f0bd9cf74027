"""Each reproduction at its small size: the measured properties the papers claim, and the
JSON + PNG the command writes. Slow ones (compiles on a CPU) are marked `slow`."""
import json

import pytest

from experiments.reproduce import (CLAIMS, flash_memory, mfu, paged_kv, pipeline_bubble, scaling_small,
                                   speculative, zero_memory)
from experiments.reproduce.__main__ import main
from experiments.reproduce.common import compare, format_comparisons, loglog_slope


def _by_impl(result, impl):
    return [r["temp_bytes"] for r in result["rows"] if r["impl"] == impl]


def test_flash_memory_linear_vs_quadratic():
    result = flash_memory.run(small=True)
    n = result["seq_lens"]
    flash, dense = _by_impl(result, "flash"), _by_impl(result, "materialized")
    assert 0.85 < loglog_slope(n, flash) < 1.15, flash
    assert 1.85 < loglog_slope(n, dense) < 2.15, dense
    assert flash[-1] < dense[-1] / 3


def test_zero_memory_matches_the_formulas():
    result = zero_memory.run(small=True)
    rows = {r["layout"]: r for r in result["rows"]}
    for r in rows.values():  # params + Adam state from the compiled program, within 10%
        assert abs(r["params_and_opt_bytes"] / r["ours_formula_params_and_opt"] - 1) < 0.10, r
        assert abs(r["total_bytes"] / r["ours_formula_bytes"] - 1) < 0.10, r
    assert rows["dp"]["total_bytes"] > rows["zero1"]["total_bytes"] > rows["fsdp"]["total_bytes"]
    assert 7 < rows["dp"]["total_bytes"] / rows["fsdp"]["total_bytes"] <= 8  # ZeRO-3: ~N


def test_pipeline_bubble_equals_formula():
    result = pipeline_bubble.run(small=True)
    assert len(result["schedules"]) == 2 * 3 * len(pipeline_bubble.MICROBATCHES)
    for r in result["schedules"]:
        p, m = r["stages"], r["microbatches"]
        assert r["bubble"] == pytest.approx((p - 1) / (m + p - 1), abs=1e-9), r
        assert r["max_in_flight"] <= (m if r["schedule"] == "gpipe" else min(m, p)), r
    assert all(c["agrees"] for c in result["comparisons"])


@pytest.mark.slow
def test_mfu_formula_matches_xla_count():
    result = mfu.run(small=True)
    assert sum(result["breakdown"].values()) == pytest.approx(result["flops_per_token"])
    assert abs(result["flops_per_token"] / result["xla_flops_per_token"] - 1) < 0.10
    # The MFU divides two timings of this run (the step, a matmul ceiling), so a loaded host can
    # move it either way: check its definition, not its size.
    achieved = result["flops_per_token"] * result["tokens_per_s"]
    assert result["mfu"] == pytest.approx(achieved / result["peak_flops"]) and result["mfu"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["batch_size"] * result["seq_len"] / result["step_s"])
    assert result["losses"][-1] < result["losses"][0]


def test_paged_kv_wastes_less_than_contiguous():
    result = paged_kv.run(small=True)
    waste, totals = result["waste"], result["totals"]
    assert 0 <= waste["paged"] < waste["oracle reservation"] < waste["max reservation"]
    # Paging wastes at most the last partial block of each running sequence per step.
    max_slack = (result["engine"]["block_size"] - 1) * result["engine"]["max_slots"] * totals["steps"]
    assert totals["paged"] - totals["live"] <= max_slack


def test_speculative_tokens_per_round_follow_eq1():
    result = speculative.run(small=True)
    alphas = [r["alpha"] for r in result["rows"]]
    assert alphas == sorted(alphas) and alphas[-1] - alphas[0] > 0.2  # damping the upper layers raises alpha
    for r in result["rows"]:
        assert r["tokens_per_round"] == pytest.approx(r["expected_tokens_per_round"], rel=0.10), r


@pytest.mark.slow
def test_scaling_small_power_law():
    result = scaling_small.run(small=True)
    losses = [r["val_loss"] for r in result["rows"]]
    assert losses[-1] < losses[0]
    assert result["fit"]["alpha_n"] > 0  # loss falls with size: a negative exponent


def test_comparison_flags_disagreement():
    close, far = compare("x", 2.0, 2.1, source="s"), compare("y", 2.0, 3.0, source="s", why="because")
    assert close["agrees"] and not far["agrees"] and far["ratio"] == 1.5
    text = format_comparisons([close, far])
    assert "DISAGREES by 50%" in text and "because" in text and text.count("DISAGREES") == 1
    # The reason follows the direction: below the paper's figure, above it, or within tolerance.
    kwargs = dict(source="s", why_low="lower", why_high="higher")
    assert compare("z", 2.0, 1.0, **kwargs)["why"] == "lower"
    assert compare("z", 2.0, 3.0, **kwargs)["why"] == "higher"
    assert compare("z", 2.0, 2.1, **kwargs)["why"] == ""


def test_paged_kv_reasons_state_this_runs_means():
    # 10 running sequence-steps at context 100: 40 live, 47.5 allocated slots per sequence on average.
    totals = {"live": 400, "paged": 475, "max reservation": 1000, "oracle reservation": 600}
    paged = paged_kv.reasons("paged", totals, context=100, block_size=16)
    assert "7.5 of 16 slots" in paged["why_low"] and "40 live tokens" in paged["why_high"]
    assert "40 of 100 slots" in paged_kv.reasons("max reservation", totals, 100, 16)["why_low"]
    assert "40 of 60 reserved" in paged_kv.reasons("oracle reservation", totals, 100, 16)["why_low"]


def test_flash_saving_reason_names_the_sizes():
    rows = [dict(impl=impl, seq_len=n, temp_bytes=t * 2**20, io_bytes=6 * 2**20, time_ms=ms)
            for impl, n, t, ms in (("flash", 512, 1, 1.0), ("flash", 1024, 2, 2.0),
                                   ("materialized", 512, 64, 4.0), ("materialized", 1024, 256, 16.0))]
    saving = flash_memory.saving_comparison(rows)
    assert saving["ours"] == 128 and "flash 2 MiB, materialized 256 MiB" in saving["why"]
    assert "with the program's inputs and outputs counted too, 33x" in saving["why"]
    speedup = flash_memory.speedup_comparison(rows)
    assert speedup["ours"] == 8 and "4.0x at 512, 8.0x at 1024" in speedup["why"]


def test_mfu_flops_need_a_cost_analysis():
    class NoAnalysis:
        def cost_analysis(self):
            return None

    class ListAnalysis:
        def cost_analysis(self):
            return [{"flops": 12.0}]

    assert mfu.compiled_flops(ListAnalysis()) == 12.0
    with pytest.raises(RuntimeError, match="no 'flops'"):
        mfu.compiled_flops(NoAnalysis())


def test_command_writes_json_and_png(tmp_path, capsys):
    assert main(["pipeline_bubble", "--small", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["claim"] == "pipeline_bubble" and saved["comparisons"] and saved["device"]
    assert (tmp_path / "pipeline_bubble.png").stat().st_size > 1000
    assert "ours/paper" in capsys.readouterr().out
    assert main(["pipeline_bubble", "--small", "--out", str(tmp_path / "pipeline_bubble_cpu.json")]) == 0
    assert json.loads((tmp_path / "pipeline_bubble_cpu.json").read_text())["claim"] == "pipeline_bubble"
    assert (tmp_path / "pipeline_bubble_cpu.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["no_such_claim"])
    assert "pipeline_bubble" in CLAIMS
