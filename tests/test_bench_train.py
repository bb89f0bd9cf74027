"""bench_train's torch peer: run as a script, or read from the results a run wrote before."""
import json

from experiments.bench_train import run_torch_peer


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
