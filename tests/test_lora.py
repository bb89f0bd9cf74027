"""LoRA: adapters start at the base, only they train, the merge is exact and exports to
Hugging Face, a fine-tune of an imported checkpoint learns, resume works, bad values fail."""
import contextlib
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import train as train_cli
from llmjax import lora
from llmjax.checkpoint import Checkpointer, CheckpointError
from llmjax.config import ConfigError, LoraConfig, MeshConfig, OptimConfig, load_config
from llmjax.convert import load_hf, save_hf
from llmjax.models import count_params, init_model, split_model
from llmjax.runs import load_run
from llmjax.train.flops import matmul_params
from llmjax.train.loop import train
from llmjax.train.metrics import read_metrics
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, lora_shardings, make_train_step
from sharding.mesh import make_mesh
from tests.convert.test_hf import (
    LLAMA,
    TOKENS,
    _transformers_logits,
    hf_tensors,
    llmjax_logits,
    random_params,
    small_cfg,
    write_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
ALL = "wq,wk,wv,wo,w_in,w_gate,w_out"


def expected_count(cfg, rank, targets):
    """L * r * (fan_in + fan_out) per target, from the model's dims."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    d, f = cfg.d_model, cfg.d_mlp
    sizes = dict(wq=d + q, wk=d + kv, wv=d + kv, wo=q + d, w_in=d + f, w_gate=d + f, w_out=f + d)
    return sum(cfg.n_layers * rank * sizes[t] for t in targets.split(","))


def leaves_with_paths(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_adapters_start_at_the_base_and_count_matches_the_formula():
    cfg = small_cfg("llama", False)
    base = random_params(cfg)
    lora_cfg = LoraConfig(rank=3, alpha=6.0, targets=ALL)
    adapters = lora.init_adapters(base, lora_cfg, jax.random.key(0))
    assert lora.count(adapters) == expected_count(cfg, 3, ALL) == 2 * 3 * (64 + 48 + 48 + 64 + 104 + 104 + 104)
    assert adapters["blocks"]["attn"]["wo"]["a"].shape == (2, 4, 8, 3)  # wo contracts (heads, head_dim)
    assert adapters["blocks"]["attn"]["wq"]["b"].shape == (2, 3, 4, 8)
    assert float(jnp.abs(adapters["blocks"]["mlp"]["w_in"]["a"]).max()) > 0
    merged = lora.merge(base, adapters, lora_cfg)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(), merged, base))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_is_base_plus_scaled_ab_exactly(tmp_path, family):
    """Dyadic adapters make A @ B exact in any summation order, so the check is bitwise."""
    cfg = small_cfg(family, tied=family == "gpt2")
    base = random_params(cfg, seed=1)
    targets = ALL if family == "llama" else "wq,wk,wv,wo,w_in,w_out"
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=targets)  # scale 2
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: rng.integers(-8, 9, x.shape).astype(np.float32) / 16,
                            lora.init_adapters(base, lora_cfg, jax.random.key(0)))
    save_hf(cfg, lora.merge(base, adapters, lora_cfg), tmp_path)
    _, loaded = load_hf(tmp_path, dtype=cfg.dtype)
    for group, name in [(lora.TARGETS[t][0][1], t) for t in targets.split(",")]:
        ab = adapters["blocks"][group][name]
        w = base["blocks"][group][name]
        prod = np.einsum("lir,lro->lio", ab["a"].reshape(2, -1, 4).astype(np.float64),
                         ab["b"].reshape(2, 4, -1).astype(np.float64))
        want = (w.astype(np.float64) + 2.0 * prod.reshape(w.shape)).astype(np.float32)
        got = loaded["blocks"][group][name]
        assert got.tobytes() == want.tobytes(), name
    assert loaded["embed"].tobytes() == base["embed"].tobytes()
    assert loaded["blocks"]["attn_norm"]["scale"].tobytes() == base["blocks"]["attn_norm"]["scale"].tobytes()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_export_loads_in_transformers_with_the_same_logits(tmp_path, family):
    """Where torch + transformers are installed (an optional test extra)."""
    hf_lib = pytest.importorskip("torch"), pytest.importorskip("transformers")
    cfg = small_cfg(family, tied=family == "gpt2")
    base = random_params(cfg, seed=6)
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=ALL if family == "llama" else "wq,wo,w_in,w_out")
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                            lora.init_adapters(base, lora_cfg, jax.random.key(0)))
    merged = jax.tree.map(np.asarray, lora.merge(base, adapters, lora_cfg))
    save_hf(cfg, merged, tmp_path)
    got = _transformers_logits(hf_lib, tmp_path, TOKENS, family)
    assert np.abs(got - llmjax_logits(cfg, merged, TOKENS)).max() < 1e-4


def test_only_adapters_train_and_optimizer_state_is_theirs():
    cfg = small_cfg("llama", False)
    base = jax.tree.map(jnp.asarray, random_params(cfg, seed=2))
    before = leaves_with_paths(base)
    graphdef = split_model(init_model(cfg))[0]
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets="wq,wv,w_gate")
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    adapters = lora.init_adapters(base, lora_cfg, jax.random.key(1))
    state = init_train_state(adapters, optimizer)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * lora.count(adapters)  # Adam's mu and nu, adapters only
    step = make_train_step(graphdef, optimizer, lora=lora_cfg)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 4, 17)), jnp.int32)
    for _ in range(3):
        state, metrics = step(state, batch, base)
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 3
    assert leaves_with_paths(base).keys() == before.keys()
    assert all(np.asarray(x).tobytes() == before[k].tobytes() for k, x in leaves_with_paths(base).items())
    assert all(float(jnp.abs(ab["b"]).max()) > 0 for group in state["params"]["blocks"].values()
               for ab in group.values())
    merged = leaves_with_paths(lora.merge(base, state["params"], lora_cfg))
    changed = {k for k in merged if merged[k].tobytes() != before[k].tobytes()}
    assert changed == {"['blocks']['attn']['wq']", "['blocks']['attn']['wv']", "['blocks']['mlp']['w_gate']"}


def test_rank_zero_is_the_plain_step():
    cfg = small_cfg("gpt2", True)
    graphdef, params = split_model(init_model(cfg))
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 4, 17)), jnp.int32)
    results = []
    for kw in ({}, {"lora": LoraConfig(rank=0, targets="wq")}):
        state = init_train_state(jax.tree.map(jnp.array, params), optimizer)
        step = make_train_step(graphdef, optimizer, **kw)
        for _ in range(2):
            state, _ = step(state, batch)
        results.append(state["params"])
    assert jax.tree.all(jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(), *results))


def test_sharded_lora_step_equals_unsharded():
    cfg = small_cfg("llama", False)
    base = jax.tree.map(jnp.asarray, random_params(cfg, seed=4))
    graphdef = split_model(init_model(cfg))[0]
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets="wq,wo,w_in")
    optimizer = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 96, (1, 8, 17)), jnp.int32)
    fresh = lambda: init_train_state(lora.init_adapters(base, lora_cfg, jax.random.key(0)), optimizer)
    plain_step = make_train_step(graphdef, optimizer, lora=lora_cfg)
    plain = fresh()
    for _ in range(2):
        plain, plain_metrics = plain_step(plain, batch, base)
    mesh = make_mesh(MeshConfig(fsdp=8, rules="fsdp"))
    state_sh, base_sh = lora_shardings(graphdef, lora_cfg, fresh(), base, mesh, "fsdp")
    assert state_sh["params"]["blocks"]["attn"]["wq"]["a"].spec[1] == "fsdp"  # A's embed dim, like wq's
    sharded_step = make_train_step(graphdef, optimizer, mesh=mesh, rules="fsdp", lora=lora_cfg)
    sharded, sharded_base = jax.device_put(fresh(), state_sh), jax.device_put(base, base_sh)
    for _ in range(2):
        sharded, sharded_metrics = sharded_step(sharded, batch, sharded_base)
    np.testing.assert_allclose(sharded_metrics["loss"], plain_metrics["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 sharded["params"], plain["params"])


# ---------------------------------------------------------------------------------------
# The loop and the entry point.

HF_LLAMA = {**LLAMA, "vocab_size": 260}  # room for the byte tokenizer (257)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A LoRA fine-tune of a random Llama checkpoint on the bundled corpus, through the CLI."""
    root = tmp_path_factory.mktemp("lora")
    hf_dir = write_checkpoint(root / "hf", HF_LLAMA, hf_tensors(HF_LLAMA, seed=3))
    overrides = [f"out_dir={root}", "model.dtype=float32", "data.tokenizer=bytes", "data.seq_len=32",
                 "train.batch_size=8", "train.steps=12", "train.eval_every=6", "train.eval_batches=2",
                 "train.checkpoint_every=6", "train.sample_tokens=0", "optim.lr=3e-2", "optim.warmup_steps=0",
                 "lora.rank=4", "lora.alpha=8"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_cli.main(["--config", str(ROOT / "experiments/configs/lora.yaml"), "--init-from-hf",
                               str(hf_dir), "--export-hf", str(root / "export"), "--no-progress", *overrides])
    assert code == 0, out.getvalue()
    return root, hf_dir, out.getvalue()


def test_lora_finetune_reports_trainable_count_and_loss_falls(finetuned):
    root, _, out = finetuned
    cfg = load_config(root / "lora" / "config.yaml")
    n = expected_count(cfg.model, 4, ALL)
    assert f": {n:,} trainable params" in out, out
    assert "no tokenizer.json for data.tokenizer=bytes: decode the run with python -m experiments.generate --run" in out
    records = read_metrics(root / "lora")
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0]["train_loss"], np.mean([r["train_loss"] for r in records[-3:]])
    assert last < first - 0.5, [r["train_loss"] for r in records]
    assert records[5]["val_loss"] > records[11]["val_loss"]


def test_lora_checkpoint_holds_adapters_and_export_is_the_merge(finetuned):
    root, hf_dir, _ = finetuned
    cfg = load_config(root / "lora" / "config.yaml")
    _, base = load_hf(hf_dir)
    template = init_train_state(lora.init_adapters(base, cfg.lora, jax.random.key(0)),
                                make_optimizer(cfg.optim, cfg.train.steps))
    ckpt = Checkpointer(root / "lora" / "checkpoints")
    try:
        state, meta = ckpt.restore(template)
    finally:
        ckpt.close()
    assert int(state["step"]) == 12 and "lora_base" in meta
    cfg_out, exported = load_hf(root / "export", dtype="float32")
    assert cfg_out == cfg.model
    for t in ALL.split(","):
        group, name = lora.TARGETS[t][0][1:]
        ab = state["params"]["blocks"][group][name]
        w = base["blocks"][group][name].astype(np.float64)
        prod = np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float64).reshape(2, -1, 4),
                         np.asarray(ab["b"], np.float64).reshape(2, 4, -1)).reshape(w.shape)
        np.testing.assert_allclose(exported["blocks"][group][name], w + 2.0 * prod, rtol=0, atol=2e-6)
    assert exported["embed"].tobytes() == base["embed"].tobytes()
    _, merged = load_hf(root / "lora" / "merged")  # the run's own copy
    assert jax.tree.all(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), merged, exported))
    # load_run opens a LoRA run through that merged copy; a step of it is refused (adapters only).
    _, model, _ = load_run(root / "lora")
    loaded = nnx.state(model, nnx.Param).to_pure_dict()
    assert jax.tree.all(jax.tree.map(lambda a, b: np.asarray(a).tobytes() == b.tobytes(), loaded, merged))
    with pytest.raises(CheckpointError, match="LoRA run"):
        load_run(root / "lora", step=6)


def tiny_lora(tmp_path, *extra):
    return load_config(overrides=[
        f"out_dir={tmp_path}", "name=t", "preset=gpt2-tiny", "data.tokenizer=bytes", "data.seq_len=32",
        "train.batch_size=4", "train.steps=4", "train.eval_every=2", "train.eval_batches=1",
        "train.checkpoint_every=2", "train.sample_tokens=0", "model.vocab_size=320",
        "lora.rank=2", "lora.targets=wq,wv,w_in", *extra])


def test_lora_mfu_counts_the_frozen_base_at_four_flops(tmp_path, monkeypatch):
    """A LoRA run's MFU takes 4 FLOPs a token for each frozen matmul weight and 6 for each
    adapter (`flops_per_token(..., n_frozen=)`), not 6 for the whole base."""
    from llmjax.train import loop
    monkeypatch.setattr(loop, "device_peak_flops", lambda: 1e9)
    cfg = tiny_lora(tmp_path)
    result = train(cfg, progress=False)
    model = cfg.model
    base = count_params(split_model(init_model(model))[1])
    per_token = (4 * matmul_params(model, base) + 6 * result.trainable_params
                 + 12 * model.n_layers * model.d_model * cfg.data.seq_len)
    rows = [r for r in read_metrics(cfg.run_dir) if r.get("mfu")]
    assert rows, "no eval line with an MFU"
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / 1e9, rel=1e-9)


def test_lora_resume_is_bit_identical_and_needs_the_same_base(tmp_path):
    whole = train(tiny_lora(tmp_path / "whole"), progress=False)
    assert whole.trainable_params == expected_count(tiny_lora(tmp_path).model, 2, "wq,wv,w_in")
    cfg = tiny_lora(tmp_path / "parts")
    assert train(cfg, stop_after=2, progress=False).stopped_by_signal
    resumed = train(cfg, resume=True, progress=False)
    assert [r["train_loss"] for r in read_metrics(cfg.run_dir)] == \
        [r["train_loss"] for r in read_metrics(tmp_path / "whole" / "t")]
    jax.tree.map(np.testing.assert_array_equal, resumed.adapters, whole.adapters)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, whole.params)
    with pytest.raises(CheckpointError, match="base of fingerprint"):
        train(tiny_lora(tmp_path / "parts", "train.seed=1"), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="cannot restore step 4"):  # adapters vs a full state
        train(tiny_lora(tmp_path / "parts", "lora.rank=0"), resume=True, progress=False)


def test_bad_lora_values_raise_clear_errors(tmp_path):
    for override, match in [("lora.rank=-1", "lora.rank=-1"), ("lora.alpha=0", "lora.alpha=0"),
                            ("lora.targets=wq,w_up", "lora.targets='wq,w_up'.*wq, wk, wv, wo, w_in, w_gate, w_out")]:
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=[override])
    base = random_params(small_cfg("gpt2", True))
    with pytest.raises(ValueError, match="'w_gate', which this model does not have.*wq, wk, wv, wo, w_in, w_out"):
        lora.init_adapters(base, LoraConfig(rank=2, targets="wq,w_gate"), jax.random.key(0))
    with pytest.raises(ValueError, match=r"lora.rank=40 exceeds min\(in, out\)=32 of wq"):
        lora.init_adapters(base, LoraConfig(rank=40, targets="wq"), jax.random.key(0))
    experts = {"blocks": {"mlp": {"w_in": np.zeros((2, 4, 32, 64), np.float32)}}}  # MoE [L, E, D, F]
    with pytest.raises(ValueError, match=r"'w_in' of shape \(2, 4, 32, 64\); LoRA supports the dense 3-d"):
        lora.init_adapters(experts, LoraConfig(rank=2, targets="w_in"), jax.random.key(0))
    with pytest.raises(ValueError, match="lora.rank=0: LoRA is off"):
        lora.merge(base, {}, LoraConfig(rank=0))
