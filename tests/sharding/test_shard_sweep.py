"""The shard sweep: mesh choice per preset, collective accounting, one end-to-end layout, the
single-device loss reference and the weak-scaling run."""
import json
import re

import pytest

from experiments.shard_sweep import (LOSS_RTOL_FP32, compare_losses, format_table, hlo_collectives, main, mesh_for,
                                     weak_scaling_sizes)
from llmjax.config import load_config
from tests.sharding.conftest import FAMILIES


@pytest.mark.parametrize("layout,n,want", [
    ("dp", 8, {"data": 8}), ("fsdp", 8, {"fsdp": 8}), ("tp", 8, {"data": 2, "tensor": 4}),
    ("fsdp_tp", 8, {"fsdp": 2, "tensor": 4}), ("cp", 8, {"sequence": 8}), ("tp", 1, {}),
    ("pp", 8, {"pipeline": 2, "data": 4}), ("pp_fsdp", 8, {"pipeline": 2, "fsdp": 4}),
])
def test_mesh_for_picks_the_largest_split_the_model_allows(layout, n, want):
    cfg = load_config(overrides=FAMILIES["llama"]).model  # kv_heads 4: tensor at most 4
    mesh_cfg = mesh_for(layout, n, cfg, micro_batch=8, seq_len=64, pp=("gpipe", 2))
    sizes = {a: getattr(mesh_cfg, a) for a in ("data", "fsdp", "pipeline", "expert", "sequence", "tensor")}
    assert {a: s for a, s in sizes.items() if s != 1} == want
    assert mesh_cfg.rules == {"pp": "dp", "pp_fsdp": "fsdp"}.get(layout, layout)


def test_mesh_for_pipeline_needs_stages_dividing_the_layers():
    cfg = load_config(overrides=FAMILIES["llama"] + ["model.n_layers=3"]).model
    with pytest.raises(ValueError, match=r"pp: no pipeline of 8 devices fits model.n_layers=3"):
        mesh_for("pp", 8, cfg, micro_batch=8, seq_len=64)


def test_mesh_for_rejects_unknown_layouts():
    with pytest.raises(ValueError, match="layout 'zero3' unknown"):
        mesh_for("zero3", 8, load_config(overrides=FAMILIES["llama"]).model, 8, 64)


def test_hlo_collectives_counts_every_output_and_loop_iteration():
    hlo = "\n".join([
        "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %ag = f32[8,64]{1,0} all-gather(f32[1,64]{1,0} %c), dimensions={0}",
        "}",
        "%cond (p: (s32[], f32[8])) -> pred[] {",
        "  %lt = pred[] compare(%a, %b), direction=LT",
        "}",
        "ENTRY %main (a: f32[4,16]) -> f32[4,16] {",
        "  %ar = (f32[4,16]{1,0}, bf16[64]{0}) all-reduce(%a, %b), channel_id=1",
        "  %ags = (f32[1,64]{1,0}, f32[8,64]{1,0}) all-gather-start(%c), dimensions={0}",
        '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}',
        "  %g = f32[4,16]{1,0} get-tuple-element(%ar), index=0",
        "}",
    ])
    # The all-gather in the loop body runs 3 times; an async start counts its results only.
    assert hlo_collectives(hlo) == {"count": 2 + 3, "bytes": 4 * 16 * 4 + 64 * 2 + 8 * 64 * 4 + 3 * 8 * 64 * 4}


def test_sweep_writes_table_json_and_plot(tmp_path, capsys):
    """The table, JSON and plot; every layout's loss after warm-up + --steps steps equals the
    same step's on one device (float32 compute: within 1e-5 relative; tests/sharding's
    equivalence tests hold every preset to it, this checks the sweep's own reference)."""
    argv = ["--layouts", "fsdp,pp", "--steps", "1", "preset=gpt2-tiny", "model.dtype=float32", "name=sweep",
            f"out_dir={tmp_path}", "train.batch_size=8", "data.seq_len=32", "mesh.pp_schedule=1f1b",
            "mesh.pp_microbatches=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fsdp +fsdp=8 .* +- *$", out, re.M), out
    assert re.search(r"^pp/1f1b/m2 +data=4,pipeline=2 .* 33\.3% *$", out, re.M), out  # (p-1)/(m+p-1)
    record = json.loads((tmp_path / "sweep" / "shard_sweep.json").read_text())
    rows, single, check = record["rows"], record["single_device"], record["loss_check"]
    for row in rows:
        assert row["predicted_params_opt_bytes"] > 0 and row["tokens_per_s"] > 0
        assert row["predicted_activation_bytes"] > 0
    assert rows[0]["bubble"] is None and rows[1]["bubble"] == pytest.approx(1 / 3)
    assert (tmp_path / "sweep" / "shard_sweep.png").stat().st_size > 0
    # The single-device reference: one device, the same batch and steps.
    assert single["n_devices"] == 1 and single["mesh"] == {} and single["loss"] > 0
    assert [r["n_devices"] for r in rows] == [8, 8]
    tol = LOSS_RTOL_FP32 * single["loss"]
    assert check["tolerance"] == pytest.approx(tol) and check["mismatched"] == []
    for r in rows:
        assert r["loss_vs_single"] == r["loss"] - single["loss"]
        assert abs(r["loss_vs_single"]) <= tol, r
        assert r["memory_ratio"] == pytest.approx(
            (r["predicted_total_bytes"] + r["predicted_activation_bytes"]) / r["compiled_bytes"])
    assert check["max_abs_loss_vs_single"] == max(abs(r["loss_vs_single"]) for r in rows)
    assert "MISMATCH" not in out
    assert re.search(r"^loss vs 1 device \(.* after 2 steps\): largest \|difference\| .*, tolerance .* "
                     r"\(1e-05 relative \(float32\)\)$", out, re.M), out


def test_loss_check_flags_rows_beyond_the_tolerance():
    row = {"mesh": {"data": 8}, "step_s": 0.01, "tokens_per_s": 1.0, "mfu": None, "bubble": None,
           "predicted_params_opt_bytes": 1, "compiled_argument_bytes": 1, "predicted_activation_bytes": 1,
           "compiled_temp_bytes": 1, "collective_bytes": 1, "memory_ratio": 1.0}
    rows = [{**row, "layout": "near", "loss": 4.0 + 3e-5}, {**row, "layout": "far", "loss": 4.0 + 5e-5}]
    fp32 = load_config(overrides=["preset=gpt2-tiny", "model.dtype=float32"]).model
    check = compare_losses(rows, {"loss": 4.0}, fp32)  # tolerance 4e-5
    assert check["mismatched"] == ["far"] and check["max_abs_loss_vs_single"] == pytest.approx(5e-5)
    lines = format_table(rows, check["tolerance"]).splitlines()
    assert not lines[1].endswith("MISMATCH") and lines[2].endswith("MISMATCH")
    bf16 = load_config(overrides=["preset=gpt2-tiny", "model.dtype=bfloat16"]).model
    check = compare_losses(rows, {"loss": 4.0}, bf16)
    assert check["tolerance"] == 2e-2 and check["mismatched"] == [] and "absolute" in check["tolerance_rule"]


def test_weak_scaling_sizes():
    assert weak_scaling_sizes(1) == [1]
    assert weak_scaling_sizes(8) == [1, 2, 4, 8]
    assert weak_scaling_sizes(6) == [1, 2, 4, 6]


def test_weak_scaling_writes_rows_json_and_plot(tmp_path, capsys):
    argv = ["--weak-scaling", "--layouts", "dp,fsdp", "--steps", "1", "preset=gpt2-tiny", "name=ws",
            f"out_dir={tmp_path}", "train.batch_size=8", "data.seq_len=16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "ws" / "weak_scaling.json").read_text())
    assert record["target_efficiency"] == 0.9
    rows = record["rows"]
    assert [(r["layout"], r["n_devices"]) for r in rows] == [(l, n) for l in ("dp", "fsdp") for n in (1, 2, 4, 8)]
    axis = {"dp": "data", "fsdp": "fsdp"}
    for r in rows:
        n = r["n_devices"]
        assert r["mesh"] == ({axis[r["layout"]]: n} if n > 1 else {})
        assert r["global_batch"] == n  # 8 sequences over 8 devices: 1 per device at every n
        # tokens/s from the batch actually run at n, not train.batch_size
        assert r["tokens_per_s"] == pytest.approx(n * 16 / r["step_s"])
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / n)
        base = next(b for b in rows if b["layout"] == r["layout"] and b["n_devices"] == 1)
        assert r["efficiency"] == pytest.approx(r["tokens_per_s_per_device"] / base["tokens_per_s"])
        assert r["loss"] > 0 and r["memory_ratio"] > 0
    assert [r["efficiency"] for r in rows if r["n_devices"] == 1] == [1.0, 1.0]
    assert re.search(r"^fsdp +8 +fsdp=8 +8 ", out, re.M), out
    assert re.search(r"^dp: lowest efficiency .* the 90% target\)$", out, re.M), out
    assert (tmp_path / "ws" / "weak_scaling.png").stat().st_size > 0


def test_weak_scaling_needs_a_batch_the_devices_divide(tmp_path, capsys):
    argv = ["--weak-scaling", "--layouts", "dp", "preset=gpt2-tiny", "name=bad", f"out_dir={tmp_path}",
            "train.batch_size=12", "data.seq_len=16"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=12" in err and "multiple of the device count 8" in err, err
    assert not (tmp_path / "bad" / "weak_scaling.json").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--weak-scaling", "--auto", "preset=gpt2-tiny"])
    assert exit_.value.code == 2
