"""bench_train's torch peer (run as a script, or read from the results a run wrote before) and
its traced kernel breakdown."""
import json

import jax
import jax.numpy as jnp
import pytest

from experiments.bench_train import kernel_lines, run_torch_peer
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
