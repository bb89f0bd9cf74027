"""End-to-end runs: resume is bit-identical, signals and NaNs keep checkpoints, bad inputs fail clearly."""
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import generate as generate_cli
from experiments import train as train_cli
from llmjax.checkpoint import CheckpointError
from llmjax.config import ConfigError, load_config
from llmjax.data import CorpusError
from llmjax.runs import load_run
from llmjax.train import loop
from llmjax.train.loop import TrainingDiverged, train
from llmjax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    return path


def tiny(tmp_path, corpus, *extra):
    return [f"out_dir={tmp_path}", "name=t", "preset=gpt2-tiny", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.seq_len=32", "train.batch_size=4", "train.steps=6", "train.eval_every=3",
            "train.eval_batches=2", "train.checkpoint_every=3", "train.sample_tokens=0", "optim.warmup_steps=2",
            *extra]


def losses(run_dir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(run_dir)]


def tb_session_starts(run_dir):
    """Steps of the session START marks in the run's TensorBoard files (records: 8-byte length,
    4-byte CRC, data, CRC). tensorboardX is imported here: a GPU machine's `-m gpu` run may
    lack it, and this module must still collect there."""
    from tensorboardX.proto import event_pb2
    starts = []
    for path in sorted((run_dir / "tb").iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                starts.append(event.step)
            i += 12 + n + 4
    return starts


def test_resume_is_bit_identical(tmp_path, corpus):
    cfg = load_config(overrides=tiny(tmp_path / "b", corpus, "train.grad_accum=2"))
    cfg_whole = load_config(overrides=tiny(tmp_path / "c", corpus, "train.grad_accum=2"))
    whole = train(cfg_whole, progress=False)
    first = train(cfg, stop_after=4, progress=False)
    assert first.step == 4 and first.stopped_by_signal
    resumed = train(cfg, resume=True, progress=False)
    assert resumed.step == 6
    assert losses(cfg.run_dir) == losses(cfg_whole.run_dir)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)


def test_resume_after_a_crash_logs_each_step_once(tmp_path, corpus):
    """A crash after step 4 was logged but before its checkpoint landed (the checkpoint removed
    here): the resume from step 3 drops step 4's record and logs it again, once."""
    cfg = load_config(overrides=tiny(tmp_path, corpus))
    train(cfg, stop_after=4, progress=False)
    shutil.rmtree(cfg.run_dir / "checkpoints" / "4")
    with pytest.raises(ConfigError, match="stop_after=3 is invalid: allowed a step after the one resumed from, 3"):
        train(cfg, resume=True, stop_after=3, progress=False)
    train(cfg, resume=True, progress=False)
    assert [s for s, _ in losses(cfg.run_dir)] == list(range(1, 7))
    # TensorBoard: the resumed writer's purge mark (a session START at step 4) hides the old step 4.
    assert 4 in tb_session_starts(cfg.run_dir)


def test_default_style_run_learns_and_samples(tmp_path, corpus):
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.steps=80", "train.eval_every=40", "optim.lr=3e-3",
                                     "train.sample_tokens=16", "train.sample_prompt=to be"))
    result = train(cfg, progress=False)
    assert result.val_loss < 0.85 * result.unigram_entropy, (result.val_loss, result.unigram_entropy)
    assert result.sample.startswith("to be") and len(result.sample) > len("to be")
    assert (cfg.run_dir / "samples.txt").read_text() == result.sample
    assert load_config(cfg.run_dir / "config.yaml") == cfg
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == list(range(1, 81))
    assert "val_loss" in records[39] and "tokens_per_s" in records[39]
    assert list((cfg.run_dir / "tb").iterdir())  # TensorBoard events
    # The generate entry point reads the same run back.
    _, model, _ = load_run(cfg.run_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(result.params),
                 [x for x in jax.tree.leaves(__import__("flax").nnx.state(model))])
    assert generate_cli.main(["--run", str(cfg.run_dir), "--prompt", "to", "--max-new-tokens", "5",
                              "--temperature", "0"]) == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    """lr 1e4 diverges after a few steps (at step 6 here); every step is checkpointed."""
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.steps=40", "train.checkpoint_every=1",
                                     "optim.lr=1e4", "optim.grad_clip=0", "optim.warmup_steps=0"))
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step (\d+); last good checkpoint: step") as info:
        train(cfg, progress=False)
    bad = int(re.search(r"at step (\d+);", str(info.value)).group(1))
    steps = sorted(int(p.name) for p in (cfg.run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert [s for s, _ in losses(cfg.run_dir)] == list(range(1, bad))  # all finite (checked above them)
    # Step bad's loss came from step bad - 1's weights: that checkpoint is removed, the one before kept.
    assert steps and steps[-1] == bad - 2 and f"last good checkpoint: step {bad - 2} in" in str(info.value)
    assert f"the checkpoint of step {bad - 1}, whose weights gave this loss, is removed" in str(info.value)
    train(cfg, resume=True, stop_after=bad - 1, progress=False)  # from the kept one: a finite loss again
    assert [s for s, _ in losses(cfg.run_dir)] == list(range(1, bad))  # step bad - 1 logged once
    assert np.isfinite(losses(cfg.run_dir)[-1][1])


def test_divergence_found_at_a_later_log_point_names_the_first_bad_step(tmp_path, corpus):
    """Losses are checked every 4 steps here; the message must still name the first bad
    step, every step before it is logged, and no checkpoint was written after it."""
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.steps=40", "train.checkpoint_every=4",
                                     "train.eval_every=4", "optim.lr=1e12", "optim.grad_clip=0",
                                     "optim.warmup_steps=0"))
    with pytest.raises(TrainingDiverged, match=r"at step (\d+);") as info:
        train(cfg, progress=False)
    bad = int(re.search(r"at step (\d+);", str(info.value)).group(1))
    assert [s for s, _ in losses(cfg.run_dir)] == list(range(1, bad))
    assert all(np.isfinite(loss) for _, loss in losses(cfg.run_dir))
    folder = cfg.run_dir / "checkpoints"  # made at the first save
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    assert all(s < bad and s % 4 == 0 for s in steps)


def test_metrics_are_fetched_once_per_log_point_with_extra_keys(tmp_path, corpus, monkeypatch):
    """One device_get per log point (checkpoint every 2, eval every 3), holding every step
    since the last; a step's extra metrics (arrays too) reach metrics.jsonl."""
    fetched, real_get, real_make = [], jax.device_get, loop.make_train_step

    def counting_get(tree):
        if isinstance(tree, list) and tree and isinstance(tree[0], dict) and "loss" in tree[0]:
            fetched.append(len(tree))
        return real_get(tree)

    def with_array_metric(*args, **kwargs):
        step_fn = real_make(*args, **kwargs)

        def step(state, batch, *rest):
            state, metrics = step_fn(state, batch, *rest)
            return state, {**metrics, "expert_load": jnp.arange(3.0) + state["step"]}
        return step

    monkeypatch.setattr(jax, "device_get", counting_get)
    monkeypatch.setattr(loop, "make_train_step", with_array_metric)
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.checkpoint_every=2"))
    train(cfg, progress=False)
    assert fetched == [2, 1, 1, 2]  # log points 2, 3, 4, 6
    records = read_metrics(cfg.run_dir)
    assert [r["expert_load"] for r in records] == [[s, s + 1, s + 2] for s in range(1, 7)]
    assert all("grad_norm" in r and "lr" in r for r in records) and "val_loss" in records[2]


def test_sigterm_saves_a_checkpoint(tmp_path, corpus):
    args = tiny(tmp_path, corpus, "train.steps=100000", "train.eval_every=2", "train.checkpoint_every=100000")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--no-progress", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # wait until it is training
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "signal SIGTERM: saved step" in out
    saved = [p for p in (tmp_path / "t" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and int(saved[0].name) >= 2


def test_bad_inputs_raise_named_errors(tmp_path, corpus):
    with pytest.raises(CorpusError, match="no_such_file.txt"):
        train(load_config(overrides=tiny(tmp_path, corpus, f"data.corpus={tmp_path / 'no_such_file.txt'}")))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        train(load_config(overrides=tiny(tmp_path, corpus, f"data.corpus={empty}")))
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 .*at least the tokenizer's vocabulary, 257"):
        train(load_config(overrides=tiny(tmp_path, corpus, "model.vocab_size=100")))
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        train(load_config(overrides=tiny(tmp_path, corpus, "name=fresh")), resume=True)


def test_existing_run_needs_resume_and_corrupt_checkpoint_is_named(tmp_path, corpus):
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.steps=3"))
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train(cfg, progress=False)
    for f in (cfg.run_dir / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot restore step 3 from .*checkpoints"):
        train(cfg, resume=True, progress=False)
    assert train_cli.main(["--resume", *tiny(tmp_path, corpus, "train.steps=3")]) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads left by the failed restore
def test_a_run_that_cannot_start_leaves_its_folder_as_it_was(tmp_path, corpus):
    """A resume that cannot restore (the model changed) keeps the run's config.yaml, so the run
    still loads; a new run that fails before its first step writes no folder; a new run into
    the folder of one that stopped before its first checkpoint is refused, not mixed in."""
    cfg = load_config(overrides=tiny(tmp_path, corpus, "train.steps=3"))
    train(cfg, progress=False)
    saved = (cfg.run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="cannot restore step 3"):
        train(load_config(overrides=tiny(tmp_path, corpus, "train.steps=3", "model.n_layers=3")), resume=True,
              progress=False)
    assert (cfg.run_dir / "config.yaml").read_text() == saved and load_run(cfg.run_dir)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 2 in .* it holds steps \[3\]"):
        load_run(cfg.run_dir, step=2)
    failing = load_config(overrides=tiny(tmp_path, corpus, "name=pp", "lora.rank=2", "mesh.pipeline=2"))
    with pytest.raises(ConfigError, match="lora.rank=2"):
        train(failing, progress=False)
    assert not failing.run_dir.exists()
    failing = load_config(overrides=tiny(tmp_path, corpus, "name=ppmb", "mesh.pipeline=2", "mesh.data=4",
                                         "mesh.pp_microbatches=8", "train.batch_size=16"))
    with pytest.raises(ValueError, match="mesh.pp_microbatches=8"):  # found before the folder is made
        train(failing, progress=False)
    assert not failing.run_dir.exists()
    failing = load_config(overrides=tiny(tmp_path, corpus, "name=fewval", "mesh.data=8", "train.batch_size=8",
                                         "data.val_fraction=0.005"))
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.005 .* splits 8 ways; got [1-7]$"):
        train(failing, progress=False)  # not a crash at the first eval
    assert not failing.run_dir.exists()
    diverging = load_config(overrides=tiny(tmp_path, corpus, "name=nan", "optim.lr=1e12", "optim.grad_clip=0",
                                           "optim.warmup_steps=0", "train.checkpoint_every=100"))
    with pytest.raises(TrainingDiverged):
        train(diverging, progress=False)
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        train(diverging, progress=False)


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.grad_clip=nan", "optim.weight_decay=inf",
                                      "model.norm_eps=nan", "name=", "name=a/b"])
def test_non_finite_numbers_and_bad_names_are_config_errors(override):
    with pytest.raises(ConfigError, match=re.escape(override.split("=")[0])):
        load_config(overrides=["preset=gpt2-tiny", override])


def test_cli_reports_config_errors(capsys):
    assert train_cli.main(["--no-progress", "model.n_layer=2"]) == 2  # overrides may follow options
    assert "did you mean 'model.n_layers'" in capsys.readouterr().err
    assert train_cli.main(["--stop-after", "0", "preset=gpt2-tiny"]) == 2
    assert "--stop-after=0 is invalid: allowed a step in [1, train.steps=" in capsys.readouterr().err
    assert generate_cli.main(["--run", "/no/such/run"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_cli.main(["--run", "/no/such/run", "--gamma", "2"])
    assert "--gamma 2 needs --draft" in capsys.readouterr().err


@pytest.mark.parametrize("layout", [["mesh.fsdp=8", "mesh.rules=fsdp"], ["mesh.data=2", "mesh.tensor=4", "mesh.rules=tp"]])
def test_sharded_run_equals_unsharded(tmp_path, corpus, layout):
    common = ["train.batch_size=8", "train.steps=3", "train.eval_every=3", "model.n_heads=4", "model.n_kv_heads=4"]
    plain = train(load_config(overrides=tiny(tmp_path / "plain", corpus, *common)), progress=False)
    cfg = load_config(overrides=tiny(tmp_path / "mesh", corpus, *common, *layout))
    sharded = train(cfg, progress=False)
    np.testing.assert_allclose([l for _, l in losses(cfg.run_dir)], [l for _, l in losses(tmp_path / "plain" / "t")],
                               rtol=1e-5)
    np.testing.assert_allclose(sharded.val_loss, plain.val_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded.params, plain.params)
    assert len(jax.tree.leaves(sharded.params)[0].sharding.device_set) == 8


def test_mesh_that_does_not_divide_is_a_config_error(tmp_path, corpus):
    with pytest.raises(ConfigError, match=r"mesh="):
        load_config(overrides=tiny(tmp_path, corpus, "train.batch_size=4", "mesh.fsdp=8", "mesh.rules=fsdp"))
    with pytest.raises(ConfigError, match=r"mesh.rules='zero9'.*fsdp"):
        load_config(overrides=["mesh.rules=zero9"])


def test_generate_from_a_hugging_face_folder(tmp_path, capsys):
    from llmjax.convert import save_hf
    from llmjax.data import load_tokenizer
    from llmjax.models import init_model, split_model

    cfg = load_config(overrides=["preset=llama-tiny", "model.vocab_size=8192"]).model
    save_hf(cfg, split_model(init_model(cfg))[1], tmp_path / "hf", tokenizer=load_tokenizer("bundled"))
    assert generate_cli.main(["--hf", str(tmp_path / "hf"), "--prompt", "ROMEO:", "--max-new-tokens", "4",
                              "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert generate_cli.main(["--hf", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_train_starts_from_a_hugging_face_checkpoint(tmp_path, corpus):
    from llmjax.convert import save_hf
    from llmjax.models import init_model, split_model

    hf_cfg = load_config(overrides=["preset=llama-tiny", "model.n_layers=3", "model.vocab_size=300"]).model
    hf_params = split_model(init_model(hf_cfg, seed=5))[1]
    save_hf(hf_cfg, hf_params, tmp_path / "hf")
    args = tiny(tmp_path, corpus, "train.steps=2", "train.eval_every=1")
    assert train_cli.main(["--no-progress", "--init-from-hf", str(tmp_path / "hf"), *args]) == 0
    run_cfg = load_config(tmp_path / "t" / "config.yaml")
    assert (run_cfg.model.family, run_cfg.model.n_layers, run_cfg.model.vocab_size) == ("llama", 3, 300)
    # The first step's loss is the imported model's loss, not a fresh init's.
    cfg = load_config(overrides=tiny(tmp_path / "fresh", corpus, "preset=llama-tiny", "model.n_layers=3",
                                     "model.vocab_size=300", "train.steps=1"))
    imported = train(cfg, init_params=hf_params, progress=False)
    assert losses(tmp_path / "t")[0][1] == losses(cfg.run_dir)[0][1]
    assert imported.step == 1
    scratch = load_config(overrides=tiny(tmp_path / "scratch", corpus, "preset=llama-tiny", "model.n_layers=3",
                                         "model.vocab_size=300", "train.steps=1"))
    train(scratch, progress=False)
    assert losses(scratch.run_dir)[0][1] != losses(cfg.run_dir)[0][1]  # init_params was used
