"""Config loading, presets, overrides and the errors users see."""
import pytest

from llmjax.config import ConfigError, ExperimentConfig, load_config, parse_overrides, save_config
from llmjax.presets import PRESETS


def test_defaults_are_gpt2_small():
    cfg = ExperimentConfig()
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.vocab_size) == (12, 768, 50257)
    assert cfg.data.seq_len == cfg.model.max_seq_len  # None resolves to the model's length


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = load_config(overrides=[f"preset={name}"])
    for key, value in PRESETS[name].items():
        assert getattr(cfg.model, key) == value


def test_order_defaults_preset_yaml_cli(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("preset: llama-tiny\nmodel:\n  n_layers: 3\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "model.tie_embeddings=true", "optim.lr=1e-3"])
    assert cfg.model.family == "llama" and cfg.model.n_layers == 3  # preset < YAML
    assert cfg.train.steps == 9 and cfg.model.tie_embeddings is True and cfg.optim.lr == 1e-3  # < CLI


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(overrides=["preset=llama-tiny", "train.steps=5", "data.seq_len=64"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides, match", [
    (["model.n_layer=4"], r"model\.n_layer=.*did you mean 'model\.n_layers'"),
    (["trian.steps=4"], r"trian=.*did you mean 'train'"),
    (["model.n_layers=four"], r"model\.n_layers='four'.*an integer"),
    (["optim.lr=fast"], r"optim\.lr='fast'.*a number"),
    (["model.tie_embeddings=maybe"], r"model\.tie_embeddings='maybe'.*true or false"),
    (["preset=gpt2-tiny", "model.n_heads=5"], r"model\.n_heads=5.*divisor of model\.d_model=64"),
    (["preset=llama-tiny", "model.n_kv_heads=3"], r"model\.n_kv_heads=3.*divisor of model\.n_heads=4: \[1, 2, 4\]"),
    (["preset=gpt2-tiny", "data.seq_len=4096"], r"data\.seq_len=4096.*at most model\.max_seq_len=128"),
    (["preset=gpt2-smal"], r"preset='gpt2-smal'.*did you mean 'gpt2-small'"),
    (["model.family=gpt3"], r"model\.family='gpt3'.*gpt2, llama"),
    (["train.batch_size=10", "train.grad_accum=4"], r"train\.grad_accum=4.*divisor of train\.batch_size=10"),
    (["decode.top_p=0"], r"decode\.top_p=0\.0"),
    (["decode.temperature=1e-39"], r"decode\.temperature=1e-39.*0 \(greedy\) or >= 1\.175e-38"),  # 0 to XLA
    (["model.n_layers"], r"key=value"),
    (["mesh.rules=pp"], r"mesh\.rules='pp'.*dp, fsdp.*\(for pipeline stages, keep a preset and set mesh\.pipeline"),
])
def test_bad_configs_name_key_and_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="no_such.yaml"):
        load_config(tmp_path / "no_such.yaml")


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b=1", "a.c=x=y", "d=2"]) == {"a": {"b": "1", "c": "x=y"}, "d": "2"}


def test_a_key_given_twice_takes_its_last_value():
    assert parse_overrides(["a.b=1", "c=2", "a.b=3"]) == {"a": {"b": "3"}, "c": "2"}


def test_bundled_experiment_configs_load():
    """Every shipped YAML loads: post-training ones (sft/dpo/rlhf/qlora) as PosttrainConfig."""
    from pathlib import Path

    from llmjax.posttrain.config import load_posttrain_config

    paths = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        posttrain = path.stem.split("_")[0] in ("sft", "dpo", "rlhf", "qlora")
        cfg = load_posttrain_config(path) if posttrain else load_config(path)
        assert cfg.name == path.stem, path


def test_pipeline_mesh_is_a_valid_config():
    """mesh.pipeline is used by the pipeline step, not by a rule row: no 'unused axis' error."""
    cfg = load_config(overrides=["preset=gpt2-tiny", "mesh.pipeline=2", "mesh.data=4", "train.batch_size=16"])
    assert cfg.mesh.shape == (4, 1, 2, 1, 1, 1)
    with pytest.raises(ConfigError, match="n_layers=2 is not divisible by mesh.pipeline=4"):
        load_config(overrides=["preset=gpt2-tiny", "mesh.pipeline=4", "mesh.data=2", "train.batch_size=16"])


def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path):
    broken, listed = tmp_path / "broken.yaml", tmp_path / "listed.yaml"
    broken.write_text("train:\n  steps: [1,\n")
    listed.write_text("- train\n- steps\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*valid YAML \(.*line 3"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"listed.yaml.*a YAML mapping of keys to values; got a list"):
        load_config(listed)
