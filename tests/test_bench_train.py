"""bench_train's torch peer (run as a script, or read from the results a run wrote before) and
its traced kernel breakdown."""
import json

import jax
import jax.numpy as jnp
import pytest

from experiments.bench_train import kernel_lines, kernel_part, matching_peer, model_part, run_torch_peer
from pallas_kernels import _bench


def test_torch_peer_rows_from_script_or_results_file(tmp_path):
    rows = [{"name": "gpt2-124M", "tok_s": 513000.0}, {"name": "gpt2-350M", "tok_s": 180000.0}]
    script = tmp_path / "peer.py"
    script.write_text(f"import json, sys\njson.dump({rows!r}, open(sys.argv[1], 'w'))\n")
    assert run_torch_peer(str(script)) == rows
    saved = tmp_path / "peer.json"
    saved.write_text(json.dumps(rows))
    assert run_torch_peer(str(saved)) == rows


def test_failing_torch_peer_gives_no_rows(tmp_path, capsys):
    script = tmp_path / "peer.py"
    script.write_text("raise SystemExit(3)\n")
    assert run_torch_peer(str(script)) == []
    assert "torch peer failed (rc 3)" in capsys.readouterr().out


def test_unreadable_or_foreign_peer_results_give_no_rows(tmp_path, capsys):
    assert run_torch_peer(str(tmp_path / "missing.json")) == []
    assert "unreadable" in capsys.readouterr().out
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"rows": [{"variant": "base"}]}))  # bench_train's own results
    assert run_torch_peer(str(ours)) == []
    assert "not a list of rows" in capsys.readouterr().out


def test_timeline_breakdown_classes_gaps_and_top_kernels():
    """Two runs of a made-up timeline (ns): a GEMM, a gap of 500, two overlapping fusions of one
    kind, the attention kernel; per run: ms by class, gaps counted once where kernels overlap."""
    one_run = [("nvjet_sm90_tst_128x128", 0, 1000), ("loop_add_fusion_3", 1500, 500),
               ("loop_add_fusion_12", 1800, 1000), ("cudnn_flash_fprop", 2800, 200)]
    kernels = one_run + [(name, start + 10_000, duration) for name, start, duration in one_run]
    ms, top = _bench.timeline_breakdown(kernels, n_runs=2)
    # Between the runs: 10_000 - 3_000 = 7_000 ns idle, over 2 runs.
    assert ms == pytest.approx({"matmul": 1e-3, "attention": 2e-4, "other": 1.5e-3,
                                "gaps": (2 * 500 + 7000) / 2 / 1e6})
    assert top[0] == ("loop_add_fusion", 0.002, 2.0)  # both sites merged: ms and launches per run
    assert [name for name, _, _ in top] == ["loop_add_fusion", "nvjet_sm90_tst_128x128", "cudnn_flash_fprop"]
    # --show-kernels prints them; counts are per step, so fractional (a crash on the H200 once)
    lines = kernel_lines(top + [("splitKreduce", 0.25, 0.5)])
    assert lines[0].split() == ["0.00", "ms", "2.00x", "loop_add_fusion"]
    assert lines[-1].split() == ["0.25", "ms", "0.50x", "splitKreduce"]


def test_traced_gpu_kernels_reads_a_trace():
    """The trace plumbing runs anywhere; off a GPU the device timeline holds no kernels."""
    f = jax.jit(lambda x: (x @ x).sum())
    kernels = _bench.traced_gpu_kernels(lambda: jax.block_until_ready(f(jnp.ones((64, 64)))))
    if jax.default_backend() == "gpu":
        assert kernels and all(duration > 0 for _, _, duration in kernels)
    else:
        assert kernels == []


HLO_TEXT = """HloModule jit_train_step

FileNames
1 "/src/llmjax/models/transformer.py"
2 "/venv/optax/_src/update.py"

FunctionNames
1 "Transformer.loss"
2 "Block.__call__"
3 "Norm.__call__"
4 "apply_updates"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=9}
2 {file_name_id=1 function_name_id=2 line=20 end_line=20 column=1 end_column=9}
3 {file_name_id=1 function_name_id=3 line=30 end_line=30 column=1 end_column=9}
4 {file_name_id=2 function_name_id=4 line=40 end_line=40 column=1 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}
4 {file_location_id=4 parent_frame_id=1}

ENTRY %main (p: f32[4]) -> f32[4] {
  %loop_add_fusion.25 = f32[4]{0} fusion(%p), kind=kLoop, calls=%c, metadata={op_name="jit(f)/add" stack_frame_id=4}
  ROOT %input_reduce_fusion = f32[4]{0} fusion(%p), kind=kInput, calls=%d, metadata={op_name="jit(f)/jvp()/reduce_sum" stack_frame_id=3}
  %copy.1 = f32[4]{0} copy(%p)
}
"""


def test_hlo_source_frames_follow_parents_to_the_outermost_call():
    frames = _bench.hlo_source_frames(HLO_TEXT)
    assert set(frames) == {"loop_add_fusion_25", "input_reduce_fusion"}  # kernel names; copy has no frame
    assert [fn for _, fn in frames["input_reduce_fusion"]] == ["Norm.__call__", "Block.__call__", "Transformer.loss"]
    assert frames["loop_add_fusion_25"] == [("/venv/optax/_src/update.py", "apply_updates")]
    assert model_part(frames["input_reduce_fusion"]) == "norm"
    assert model_part(frames["loop_add_fusion_25"]) == "optimizer"
    assert model_part(frames["input_reduce_fusion"][1:]) == "residual"  # Block.__call__'s own adds
    assert model_part([("/src/x.py", "embed")]) == "other"


def test_kernel_parts_by_name_then_by_fusion():
    frames = _bench.hlo_source_frames(HLO_TEXT)
    assert kernel_part("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT", frames) == "matmul"
    assert kernel_part("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>", frames) == "attention"
    assert kernel_part("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", frames) == "attention"
    assert kernel_part("layer_norm_bwd__2", frames) == "norm"  # Pallas kernels: by their name
    assert kernel_part("cross_entropy_chunk", frames) == "loss"
    assert kernel_part("loop_add_fusion_25", frames) == "optimizer"
    assert kernel_part("Memset 0", frames) == "other"


def test_model_parts_of_a_compiled_train_step():
    """On a real compiled step (CPU): every part the rules name but residual is found, and a layer norm's
    frames run Norm -> Block -> ... outward, so the parent ids are read the right way round."""
    from llmjax.config import load_config
    from llmjax.models import init_model, split_model
    from llmjax.train.optimizer import lr_schedule, make_optimizer
    from llmjax.train.step import init_train_state, make_train_step

    cfg = load_config(overrides=["preset=gpt2-tiny"])
    graphdef, params = split_model(init_model(cfg.model, seed=0))
    optimizer = make_optimizer(cfg.optim, 10)
    step = make_train_step(graphdef, optimizer, lr_schedule(cfg.optim, 10))
    batch = jnp.zeros((1, 2, 17), jnp.int32)
    text = step.lower(init_train_state(params, optimizer), batch).compile().as_text()
    frames = _bench.hlo_source_frames(text)
    parts = {model_part(calls) for calls in frames.values()}
    # No "residual": a dense block's adds run inside its norms (Norm.add), which count as norm.
    assert {"loss", "norm", "attention", "mlp", "optimizer"} <= parts
    norm_chains = [[fn for _, fn in calls] for calls in frames.values()
                   if any(fn == "Norm.__call__" for _, fn in calls)]
    assert norm_chains
    for chain in norm_chains:
        i = chain.index("Norm.__call__")
        assert chain[i + 1] in ("Block.__call__", "Transformer._hidden_and_aux", "Transformer.hidden_states"), chain
    add_norms = [calls for calls in frames.values() if any(fn == "Norm.add" for _, fn in calls)]
    assert add_norms and all(model_part(calls) == "norm" for calls in add_norms)  # the fused residual add too


def test_peer_row_matches_the_config():
    """The peer script reports every size; a config is compared with its own (gpt2-350m-h100 was
    once set against the first row, the 124M one)."""
    rows = [{"name": "gpt2-124M", "tok_s": 5e5}, {"name": "gpt2-350M", "tok_s": 1.9e5}]
    assert matching_peer(rows, None, "gpt2-350m-h100")["name"] == "gpt2-350M"
    assert matching_peer(rows, None, "gpt2-124m-h100")["name"] == "gpt2-124M"
    assert matching_peer(rows, "gpt2-124M", "gpt2-350m-h100")["name"] == "gpt2-124M"
    assert matching_peer(rows, None, "llama-1b-h100") is None
    assert matching_peer(rows + [{"name": "gpt2", "tok_s": 1.0}], None, "gpt2-350m-h100")["name"] == "gpt2-350M"
    assert matching_peer([{"name": "gpt2-3", "tok_s": 1.0}], None, "gpt2-350m-h100") is None
    with pytest.raises(SystemExit, match="'gpt2-1B' is not a row"):
        matching_peer(rows, "gpt2-1B", "gpt2-350m-h100")
