"""The shard sweep: mesh choice per preset, collective accounting, one end-to-end layout."""
import json
import re

import pytest

from experiments.shard_sweep import hlo_collectives, main, mesh_for
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
    argv = ["--layouts", "fsdp,pp", "--steps", "1", "preset=gpt2-tiny", "name=sweep", f"out_dir={tmp_path}",
            "train.batch_size=8", "data.seq_len=32", "mesh.pp_schedule=1f1b", "mesh.pp_microbatches=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fsdp +fsdp=8 .* +- *$", out, re.M), out
    assert re.search(r"^pp/1f1b/m2 +data=4,pipeline=2 .* 33\.3% *$", out, re.M), out  # (p-1)/(m+p-1)
    rows = json.loads((tmp_path / "sweep" / "shard_sweep.json").read_text())["rows"]
    for row in rows:
        assert row["predicted_params_opt_bytes"] > 0 and row["tokens_per_s"] > 0
        assert row["predicted_activation_bytes"] > 0
    assert rows[0]["bubble"] is None and rows[1]["bubble"] == pytest.approx(1 / 3)
    assert (tmp_path / "sweep" / "shard_sweep.png").stat().st_size > 0
