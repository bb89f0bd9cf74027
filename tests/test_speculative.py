"""Speculative decoding: greedy output equals the target's, sampled output follows the target's
distribution (chi-square on a tiny vocabulary), and bad arguments are rejected."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llmjax.config import DecodeConfig, load_config
from llmjax.decode import generate, speculative_generate
from llmjax.decode.sampling import filter_logits
from llmjax.decode.generate import doubled as generate_doubled
from llmjax.decode.speculative import expected_tokens_per_round, truncated_draft
from llmjax.models import init_model


def tiny(seed, *overrides):
    return init_model(load_config(overrides=["preset=llama-tiny", *overrides]).model, seed=seed)


def test_greedy_equals_target_greedy_generate():
    target = tiny(1)
    prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 512, dtype=jnp.int32)
    cfg = DecodeConfig(max_new_tokens=20, temperature=0.0)
    expected = np.asarray(generate(target, prompt, cfg))
    # An unrelated draft: nearly every draft rejected.
    unrelated = speculative_generate(target, tiny(2, "model.n_layers=1"), prompt[:1], cfg, gamma=3)
    np.testing.assert_array_equal(unrelated.tokens, expected[:1])
    # The target's own first layer as draft accepts some drafts and rejects others, so the two
    # rows (vmapped) reach different positions in the same round.
    early_exit = speculative_generate(target, truncated_draft(target, 1), prompt, cfg, gamma=3)
    np.testing.assert_array_equal(early_exit.tokens, expected)
    assert unrelated.acceptance_rate < early_exit.acceptance_rate < 1.0
    assert early_exit.rejected.sum() > 0 and early_exit.accepted.sum() > 0
    assert early_exit.rounds[0] != early_exit.rounds[1]
    # Each round yields its accepted drafts plus one token; the first token comes from prefill.
    # The last round may overshoot by up to gamma tokens.
    for r in (unrelated, early_exit):
        assert np.all(r.accepted + r.rounds >= 19) and np.all(r.accepted + r.rounds <= 19 + 3)


@pytest.mark.parametrize("temperature", [0.0, 0.2])
def test_single_row_draft_decoded_as_two_rows_matches(temperature, monkeypatch):
    """A batch-1 draft run as two identical rows (what a GPU does, see doubles_single_row) gives
    the same tokens and acceptance counts, greedy and sampled."""
    module = importlib.import_module("llmjax.decode.speculative")
    target = tiny(1)
    # The target's first layer as draft gets some tokens accepted and some rejected (sampled at a
    # low temperature: the random tiny models' distributions are near uniform at 1).
    draft = truncated_draft(target, 1)
    prompt = jax.random.randint(jax.random.key(0), (1, 5), 0, 512, dtype=jnp.int32)
    cfg = DecodeConfig(max_new_tokens=12, temperature=temperature, seed=3)
    results = {}
    for double in (False, True):
        module._speculative.clear_cache()  # so the program is traced here, with the spy below
        doublings = []
        monkeypatch.setattr(module, "doubles_single_row", lambda prompt, double=double: double)
        monkeypatch.setattr(module, "doubled", lambda c: doublings.append(1) or generate_doubled(c))
        results[double] = speculative_generate(target, draft, prompt, cfg, gamma=3)
        assert bool(doublings) is double  # the doubled program was traced
    single, two = results[False], results[True]
    np.testing.assert_array_equal(two.tokens, single.tokens)
    for name in ("rounds", "accepted", "rejected"):
        np.testing.assert_array_equal(getattr(two, name), getattr(single, name))
    assert single.accepted.sum() > 0 and single.rejected.sum() > 0  # both branches of a round ran


def test_sampled_tokens_follow_the_target_distribution():
    """Tokens 2 and 3 come from the first speculative round (token 1 from the prefill). Their
    empirical joint over 4000 rows must match the target's exact joint (chi-square), and the
    same test must reject the draft's joint (it has the power to see a wrong sampler)."""
    small = ["model.vocab_size=8", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
             "model.d_mlp=64", "model.init_std=0.3"]  # peaked, target and draft far apart
    target, draft = tiny(1, *small), tiny(2, *small, "model.n_layers=1")
    cfg = DecodeConfig(max_new_tokens=3, temperature=0.9, top_k=6, seed=3)
    n_rows, t0 = 4000, 3
    prompt = jnp.tile(jnp.array([[1, 5, 2]], jnp.int32), (n_rows, 1))
    result = speculative_generate(target, draft, prompt, cfg, gamma=2)
    samples = np.asarray(result.tokens[:, t0 + 1] * 8 + result.tokens[:, t0 + 2])
    observed = np.bincount(samples, minlength=64)
    assert 0.1 < result.acceptance_rate < 0.9  # both accepts and rejections happened

    def exact_joint(model):  # P(token 2, token 3) after the prompt, summed over token 1
        x1, x2 = np.divmod(np.arange(64), 8)
        seqs = jnp.concatenate([prompt[:64], jnp.asarray(x1)[:, None], jnp.asarray(x2)[:, None]], 1)
        probs = jax.nn.softmax(filter_logits(model(seqs)[0], temperature=0.9, top_k=6))
        p1 = probs[0, t0 - 1][x1]  # [64]: P(x1)
        p2 = probs[np.arange(64), t0, x2]  # [64]: P(x2 | x1)
        joint = (p1 * p2)[:, None] * probs[:, t0 + 1]  # [64 = (x1, x2), 8 = x3]
        return np.asarray(joint.reshape(8, 8, 8).sum(0).reshape(64), np.float64)

    def p_value(expected):
        expected = expected / expected.sum() * n_rows
        big = expected >= 5  # pool the rare cells into one
        obs = np.append(observed[big], observed[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        return stats.chisquare(obs, exp).pvalue

    assert p_value(exact_joint(target)) > 1e-3
    assert p_value(exact_joint(draft)) < 1e-6


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_bad_arguments_are_rejected():
    target = tiny(1)
    prompt = jnp.ones((1, 4), jnp.int32)
    cfg = DecodeConfig(max_new_tokens=8, temperature=0.0)
    with pytest.raises(ValueError, match="gamma=0 must be an integer >= 1"):
        speculative_generate(target, target, prompt, cfg, gamma=0)
    with pytest.raises(ValueError, match="draft vocab_size=256 differs"):
        speculative_generate(target, tiny(2, "model.vocab_size=256"), prompt, cfg)
    with pytest.raises(ValueError, match=r"prompt length 4 \+ decode.max_new_tokens \+ gamma=128 = 132"):
        speculative_generate(target, target, prompt, DecodeConfig(max_new_tokens=124), gamma=4)
    with pytest.raises(ValueError, match=r"n_layers=3 must be in \[1, 2\]"):
        truncated_draft(target, 3)
