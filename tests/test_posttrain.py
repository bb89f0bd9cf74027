"""Post-training: SFT masking and packing, DPO loss, reward model + GRPO, QLoRA (tiny models, CPU)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ModelConfig
from llmjax.data import ByteTokenizer, load_corpus
from llmjax.models import init_model, split_model
from llmjax.posttrain import chat, packing
from llmjax.posttrain.forward import token_logprobs
from llmjax.posttrain.sft import sft_loss

TINY = ModelConfig(family="gpt2", n_layers=1, n_heads=2, n_kv_heads=2, d_model=32, d_mlp=64,
                   vocab_size=257, max_seq_len=96, dtype="float32")


@pytest.fixture(scope="module")
def tiny():
    return split_model(init_model(TINY, seed=0))


@pytest.fixture(scope="module")
def docs():
    return load_corpus("shakespeare")[:2]


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = rng.integers(3, 12), rng.integers(2, 8)
        ids = rng.integers(0, 256, p + r).astype(np.int32)
        out.append((ids, np.arange(p + r) >= p))
    return out


def test_chat_template_masks_the_prompt(docs):
    tok = ByteTokenizer()
    ex = chat.instruction_examples(docs, 4, seed=1)
    assert {e.prompt.split("\n")[0] for e in ex} == {"Continue this passage:", "Who speaks next?"}
    ids, mask = chat.encode_chat(tok, ex[0].prompt, ex[0].response)
    assert tok.decode(ids[~mask]) == chat.format_prompt(ex[0].prompt)
    assert tok.decode(ids[mask]) == ex[0].response and ids[-1] == tok.eos_id
    with pytest.raises(ValueError, match="empty response"):
        chat.encode_chat(tok, "hi", "")


def test_sft_loss_ignores_prompt_and_padding_targets(tiny):
    graphdef, params = tiny
    batch = {k: jnp.asarray(v) for k, v in packing.pad_examples(_examples(4), 24).items()}
    grad = jax.jit(jax.value_and_grad(lambda p, b: sft_loss(p, graphdef, b)[0]))
    loss, g = grad(params, batch)
    masked = batch["weights"] == 0
    scrambled = dict(batch, targets=jnp.where(masked, (batch["targets"] + 7) % 256, batch["targets"]))
    loss2, g2 = grad(params, scrambled)
    assert float(loss) == pytest.approx(float(loss2), abs=0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), g, g2)
    response = dict(batch, targets=jnp.where(masked, batch["targets"], (batch["targets"] + 7) % 256))
    assert abs(float(grad(params, response)[0]) - float(loss)) > 1e-3  # response targets do count


def test_packed_equals_unpacked(tiny):
    graphdef, params = tiny
    examples = _examples(6, seed=3)
    packed = packing.pack_examples(examples, 40)
    padded = packing.pad_examples(examples, 40)
    assert len(packed["tokens"]) < len(padded["tokens"])
    logp = jax.jit(lambda b, seg: token_logprobs(params, graphdef, b["tokens"], b["targets"],
                                                 b["segment_ids"] if seg else None, b["positions"]),
                   static_argnums=1)

    def per_example(batch, values):  # response-token log-probs of each example, in order
        out = []
        for row in range(len(batch["tokens"])):
            for seg in range(1, batch["segment_ids"][row].max() + 1):
                sel = (batch["segment_ids"][row] == seg) & (batch["weights"][row] > 0)
                out.append(np.asarray(values[row])[sel])
        return out

    ref = per_example(padded, logp(padded, True))
    got = per_example(packed, logp(packed, True))
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    leaky = per_example(packed, logp(packed, False))  # without the segment mask, examples mix
    assert max(np.abs(a - b).max() for a, b in zip(ref, leaky)) > 1e-3
    loss = lambda b: float(sft_loss(params, graphdef, {k: jnp.asarray(v) for k, v in b.items()})[0])
    assert loss(packed) == pytest.approx(loss(padded), rel=1e-5)


def test_packing_rejects_examples_longer_than_the_context():
    with pytest.raises(ValueError, match="example 1 has 30 tokens"):
        packing.pack_examples([_examples(1)[0], (np.zeros(30, np.int32), np.ones(30, bool))], 20)


def _tiny_cfg(tmp_path, **overrides):
    from llmjax.posttrain.config import load_posttrain_config

    model = {f"model.{k}": v for k, v in dataclasses.asdict(TINY).items()
             if k in ("family", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_mlp", "vocab_size", "dtype")}
    base = {**model, "model.max_seq_len": 256, "seq_len": 256, "out_dir": str(tmp_path), "tokenizer": "bytes",
            "optim.warmup_steps": 2, "optim.weight_decay": 0.0, **overrides}
    return load_posttrain_config(None, [f"{k}={v}" for k, v in base.items()])


def test_dpo_loss_matches_hand_computation():
    from llmjax.posttrain.dpo import dpo_loss

    pc, pr, rc, rr, beta = -10.0, -12.0, -11.0, -11.5, 0.5
    # h = beta * ((pc - rc) - (pr - rr)) = 0.5 * (1 - (-0.5)) = 0.75
    loss, m = dpo_loss(*(jnp.array([x]) for x in (pc, pr, rc, rr)), beta)
    assert float(loss) == pytest.approx(np.log1p(np.exp(-0.75)), rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(0.75) and float(m["accuracy"]) == 1.0
    # Gradients against the hand-written derivative: d/d pc = -beta * sigmoid(-h) / N.
    x = jax.random.normal(jax.random.key(0), (4, 5)) * 3
    grads = jax.grad(lambda a: dpo_loss(a[0], a[1], a[2], a[3], beta)[0])(x)
    hs = beta * ((x[0] - x[2]) - (x[1] - x[3]))
    g = -beta * jax.nn.sigmoid(-hs) / 5
    np.testing.assert_allclose(grads, jnp.stack([g, -g, -g, g]), rtol=1e-5, atol=1e-7)


def test_preference_batch_rejects_bad_pairs():
    from llmjax.posttrain.dpo import preference_batch

    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="no preference pairs"):
        preference_batch(tok, [], 64)
    with pytest.raises(ValueError, match="pair 1 has chosen == rejected"):
        preference_batch(tok, [chat.Preference("p", "a b", "b a"), chat.Preference("p", "x", "x")], 64)
    with pytest.raises(ValueError, match="longer than the context"):
        preference_batch(tok, [chat.Preference("p" * 80, "a b", "b a")], 64)


def test_dpo_raises_held_out_accuracy(tmp_path, capsys):
    from llmjax.posttrain.dpo import run_dpo

    cfg = _tiny_cfg(tmp_path, name="dpo", n_examples=256, steps=30, eval_every=15, batch_size=16,
                    **{"optim.lr": 2e-3, "val_fraction": 0.25})
    _, held_out, _ = run_dpo(cfg)
    assert held_out["accuracy"] >= 0.7, held_out  # 50% is chance; the reference's margins are all 0
    assert held_out["reward_margin"] > 0
    assert (tmp_path / "dpo" / "metrics.jsonl").read_text().count('"kind": "eval"') == 2


SMALL_VOCAB = dataclasses.replace(TINY, vocab_size=16, max_seq_len=32)


def test_grpo_gradient_pushes_up_high_advantage_samples():
    from llmjax.posttrain.grpo import grpo_loss

    graphdef, params = split_model(init_model(SMALL_VOCAB, seed=1))
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 16)
    logp = jax.jit(lambda p: token_logprobs(p, graphdef, tokens[:, :-1], tokens[:, 1:]))
    old = logp(params)
    weights = jnp.ones((2, 9)).at[:, :3].set(0.0)  # 4-token prompt, 6 completion tokens
    batch = {"tokens": tokens, "weights": weights, "old_logp": old, "ref_logp": old,
             "advantages": jnp.array([1.0, -1.0])}
    loss, grads = jax.jit(jax.value_and_grad(lambda p: grpo_loss(p, graphdef, batch, 0.0, 0.2)[0]))(params)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)  # rho = 1, advantages sum to zero
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    change = ((logp(stepped) - old) * weights).sum(1)
    assert float(change[0]) > 1e-3 and float(change[1]) < -1e-3, change


def test_grpo_raises_a_toy_reward():
    import optax

    from llmjax.config import DecodeConfig
    from llmjax.posttrain.grpo import GRPO, target_token_reward

    graphdef, params = split_model(init_model(SMALL_VOCAB, seed=0))
    grpo = GRPO(graphdef, params, optax.adam(1e-2), target_token_reward(3),
                DecodeConfig(max_new_tokens=8, temperature=1.0), group_size=8, beta=0.2, clip_eps=0.2)
    state = grpo.init(params)
    prompts = jax.random.randint(jax.random.key(0), (4, 4), 0, 16)
    rewards, kls = [], []
    for i in range(8):
        state, record = grpo.iterate(state, None, prompts, jax.random.key(100 + i))
        rewards.append(record["reward"])
        kls.append(record["kl"])
        assert record["rollout_s"] > 0 and record["train_s"] > 0
    assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.15, rewards  # from ~1/16
    # Bounded: reaching reward 0.5 from uniform over 16 tokens needs a per-token KL of ~0.7.
    assert 0 < kls[-1] < 1.0, kls


def test_reward_model_scores_the_last_real_token_and_bradley_terry_loss(tiny):
    from llmjax.posttrain.reward import (
        bradley_terry_loss,
        init_reward_model,
        reward_scores,
    )

    graphdef, params = tiny
    rm = init_reward_model(params, TINY.d_model)
    rm["head"] = {"w": jax.random.normal(jax.random.key(1), (TINY.d_model,)), "b": jnp.array(0.5)}
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 256)
    padded = tokens.at[:, 8:].set(0)  # padding after 8 real tokens must not matter
    score = jax.jit(lambda t, n: reward_scores(rm, graphdef, t, n))
    lengths = jnp.array([8, 8])
    np.testing.assert_allclose(score(tokens, lengths), score(padded, lengths), rtol=1e-6)
    assert abs(float(score(tokens, jnp.array([12, 12]))[0] - score(tokens, lengths)[0])) > 1e-4
    loss, m = bradley_terry_loss(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
    assert float(loss) == pytest.approx((np.log1p(np.exp(-1.0)) + np.log1p(np.exp(1.0))) / 2, rel=1e-6)
    assert float(m["accuracy"]) == 0.5


def test_nf4_round_trip_within_the_stated_bound():
    from llmjax.posttrain import qlora

    assert len(qlora.NF4_LEVELS) == 16 and 0.0 in qlora.NF4_LEVELS and qlora.NF4_LEVELS[-1] == 1.0
    w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * 0.02  # 960 values per layer: 15 blocks of 64
    q = qlora.quantize_nf4(w, 64, lead=1)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 15, 32)
    err = np.abs(np.asarray(q[...] - w)).reshape(3, 15, 64)
    bound = np.asarray(qlora.max_error(q.scales))[..., None]
    assert (err <= bound * (1 + 1e-6)).all() and err.max() > 0
    ragged = jax.random.normal(jax.random.key(1), (7, 9))  # 63 values: one padded block
    np.testing.assert_array_less(np.abs(qlora.quantize_nf4(ragged, 16)[...] - ragged),
                                 np.asarray(qlora.max_error(jnp.abs(ragged).max())) + 1e-6)


def test_qlora_base_is_smaller_and_a_qlora_step_trains():
    import optax

    from llmjax.config import LoraConfig
    from llmjax.lora import init_adapters, merge
    from llmjax.posttrain import qlora
    from llmjax.posttrain.step import init_state, make_step

    cfg = dataclasses.replace(TINY, d_model=64, d_mlp=256, n_layers=2)
    graphdef, params = split_model(init_model(cfg, seed=0))
    lora = LoraConfig(rank=4, alpha=8.0, targets="wq,wv,w_in")
    base = qlora.quantize_base(params, block=64)
    report = qlora.memory_report(params, base)
    assert report["base_bf16_over_nf4"] >= 3.0, report
    adapters = init_adapters(params, lora, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape), adapters)
    # Reading the NF4 weights with adapters attached == LoRA-merging the dequantized base.
    batch = {k: jnp.asarray(v) for k, v in packing.pad_examples(_examples(8), 24).items()}
    attached = jax.jit(lambda a: sft_loss(qlora.attach(base, a, lora), graphdef, batch)[0])(adapters)
    merged = jax.jit(lambda a: sft_loss(merge(qlora.dequantize_base(base), a, lora), graphdef, batch)[0])(adapters)
    assert float(attached) == pytest.approx(float(merged), rel=1e-5)
    step = make_step(lambda p, b: sft_loss(p, graphdef, b), optax.adam(1e-2), lambda a, f: qlora.attach(f, a, lora))
    state, losses = init_state(adapters, optax.adam(1e-2)), []
    for _ in range(8):
        state, metrics = step(state, batch, base)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


def test_bad_configs_name_the_key(tmp_path, capsys):
    from experiments.posttrain import main_for
    from llmjax.config import ConfigError
    from llmjax.posttrain.config import load_posttrain_config

    with pytest.raises(ConfigError, match="group_size=1"):
        load_posttrain_config(None, ["group_size=1"])
    with pytest.raises(ConfigError, match="lora.rank=0"):
        load_posttrain_config(None, ["qlora=true"])
    with pytest.raises(ConfigError, match="prompt_tokens=60"):
        load_posttrain_config(None, ["preset=gpt2-tiny", "prompt_tokens=60", "max_new_tokens=100"])
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        load_posttrain_config(None, ["betta=0.1"])
    for override in ("beta=nan", "temperature=inf", "clip_eps=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_posttrain_config(None, [override])
    with pytest.raises(ConfigError, match=r"target_token=99999 .*\[0, model.vocab_size=512\)"):
        load_posttrain_config(None, ["preset=gpt2-tiny", "reward=target_token", "target_token=99999"])
    assert main_for("sft", lambda cfg: None, str, ["seq_len=0"]) == 2
    assert "seq_len=0" in capsys.readouterr().err
    from llmjax.posttrain.run import load_start
    from llmjax.posttrain.sft import run_sft
    assert main_for("sft", run_sft, str, ["preset=gpt2-tiny", "seq_len=16", f"out_dir={tmp_path}"]) == 2
    assert "0 of 256 fit seq_len=16" in capsys.readouterr().err and not any(tmp_path.iterdir())
    from llmjax.posttrain.dpo import run_dpo
    assert main_for("dpo", run_dpo, str, ["preset=gpt2-tiny", "seq_len=16", f"out_dir={tmp_path}"]) == 2
    assert "enough preference pairs: 0 of 256 fit seq_len=16" in capsys.readouterr().err
    assert main_for("sft", load_start, str, ["preset=gpt2-tiny", f"init_from={tmp_path}"]) == 2  # no run there
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.gpu
def test_qlora_sft_gpt2_small_on_gpu(tmp_path):
    """GPT-2 small (124M) QLoRA SFT: base >= 3x smaller than bf16, and the loss falls."""
    from llmjax.posttrain.config import load_posttrain_config
    from llmjax.posttrain.sft import run_sft

    cfg = load_posttrain_config(None, [f"out_dir={tmp_path}", "name=qlora_gpu", "preset=gpt2-small",
                                       "tokenizer=bundled", "seq_len=256", "steps=40", "eval_every=40",
                                       "batch_size=16", "qlora=true", "lora.rank=8", "optim.lr=1e-2",
                                       "optim.warmup_steps=5", "optim.weight_decay=0", "model.dtype=bfloat16"])
    _, val_loss, _ = run_sft(cfg)
    lines = (tmp_path / "qlora_gpu" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert rows[0]["base_bf16_over_nf4"] >= 3.0
    assert val_loss < rows[1]["val_loss"] - 0.1, rows


def test_rlhf_pipeline_logs_reward_model_and_rollout_vs_train_time(tmp_path):
    from llmjax.posttrain.rlhf import run_rlhf

    cfg = _tiny_cfg(tmp_path, name="rlhf", n_examples=24, rm_steps=2, steps=2, eval_every=1, batch_size=4,
                    prompt_tokens=40, prompts_per_iter=2, group_size=2, max_new_tokens=4)
    _, records, _ = run_rlhf(cfg)
    rows = [json.loads(line) for line in (tmp_path / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["setup", "reward_model", "reward_model", "grpo", "grpo"]
    assert all(r["rollout_s"] > 0 and r["train_s"] > 0 and np.isfinite(r["reward"]) for r in records)
