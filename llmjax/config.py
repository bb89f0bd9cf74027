"""Experiment configuration: frozen dataclasses, YAML files, dotted command-line overrides.

Resolution order (later wins): dataclass defaults < model preset < YAML < CLI `key=value`.
The preset is named by the top-level key `preset` (in YAML or on the command line) and
fills `model.*`; see `llmjax/presets.py`. Every error is a `ConfigError` that names the
dotted key the user typed, the value, what is allowed and, for typos, the closest key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TINIEST_TEMPERATURE = 2.0 ** -126  # float32's smallest normal: XLA flushes smaller ones to 0


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the dotted key."""

    def __init__(self, key: str, value: Any, allowed: str, closest: str | None = None):
        msg = f"{key}={value!r} is invalid: allowed {allowed}"
        if closest:
            msg += f" (did you mean {closest!r}?)"
        super().__init__(msg)
        self.key, self.value = key, value


def _check_choice(key: str, value: str, choices: tuple[str, ...], note: str = ""):
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(choices) + (f" ({note})" if note else ""))


def _check_positive(prefix: str, obj, names: tuple[str, ...], allow_zero=False):
    """Raise ConfigError for the first field of `names` that is not a finite number > 0 (>= 0 if
    allow_zero: NaN and inf fail too); keys are `prefix.name`, or `name` for a top-level config
    (prefix "")."""
    for name in names:
        v = getattr(obj, name)
        if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{prefix}.{name}" if prefix else name, v,
                              "a finite number >= 0" if allow_zero else "a finite number > 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Decoder-only transformer. Defaults: GPT-2 small (124M).

    `family` picks the block: `gpt2` (LayerNorm, GELU MLP, learned positions, biases) or
    `llama` (RMSNorm, SwiGLU MLP, RoPE, no biases). Tying and sizes are separate fields.
    """

    family: str = "gpt2"
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    vocab_size: int = 50257
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype; params stay in param_dtype
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # xla | cudnn | pallas | auto
    norm_impl: str = "xla"  # xla | pallas
    loss_impl: str = "xla"  # xla (materialized logits) | fused (chunked, logits never whole)
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    # lax.scan over the stacked layers (compile time independent of depth) or a Python loop
    # (unrolled: no stacked-residual copies between layers; faster on a GPU, slower to compile).
    scan_layers: bool = True
    # Training runs q|k|v and SwiGLU's gate|up as one matmul each (weights side by side); false:
    # one matmul per weight (no split of the joint output, no concatenate of its gradient).
    fuse_projections: bool = True
    # Mixture of experts (0 experts = the dense feed-forward block).
    n_experts: int = 0
    moe_top_k: int = 2  # experts per token
    n_shared_experts: int = 0  # always-on experts beside the routed ones
    moe_capacity_factor: float = 0.0  # 0 = dropless; else slots per expert = factor * tokens * top_k / experts
    moe_aux_loss_weight: float = 0.01  # load-balancing loss (Switch Transformer)
    moe_z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
    moe_impl: str = "ragged"  # ragged (sorted tokens, lax.ragged_dot) | dense (every expert on every token)

    def __post_init__(self):
        _check_choice("model.family", self.family, ("gpt2", "llama"))
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _check_choice("model.attention_impl", self.attention_impl, ("xla", "cudnn", "pallas", "auto"))
        _check_choice("model.norm_impl", self.norm_impl, ("xla", "pallas"))
        _check_choice("model.loss_impl", self.loss_impl, ("xla", "fused"))
        _check_choice("model.remat", self.remat, ("none", "full", "dots"))
        _check_choice("model.moe_impl", self.moe_impl, ("ragged", "dense"))
        _check_positive("model", self, ("n_experts", "n_shared_experts", "moe_capacity_factor",
                                        "moe_aux_loss_weight", "moe_z_loss_weight"), allow_zero=True)
        if self.n_experts and not 1 <= self.moe_top_k <= self.n_experts:
            raise ConfigError("model.moe_top_k", self.moe_top_k,
                              f"an integer in [1, model.n_experts={self.n_experts}]")
        _check_positive("model", self, ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_mlp",
                                        "vocab_size", "max_seq_len", "norm_eps", "init_std"))
        if self.d_model % self.n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 128]
            raise ConfigError("model.n_heads", self.n_heads,
                              f"a divisor of model.d_model={self.d_model}, e.g. {divisors[-6:]}")
        if self.n_heads % self.n_kv_heads:
            divisors = [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]
            raise ConfigError("model.n_kv_heads", self.n_kv_heads,
                              f"a divisor of model.n_heads={self.n_heads}: {divisors}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head (1 = multi-head, n_heads = multi-query)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Corpus, tokenizer and sequence packing."""

    corpus: str = "shakespeare"  # bundled name, a text file, or a folder of .txt/.md files
    tokenizer: str = "bundled"  # bundled | bytes | path to an HF tokenizer.json
    seq_len: int | None = None  # tokens per training sequence; None = model.max_seq_len
    val_fraction: float = 0.05

    def __post_init__(self):
        if self.seq_len is not None:
            _check_positive("data", self, ("seq_len",))
        if not 0.0 < self.val_fraction <= 0.5:  # as split_train_val takes it
            raise ConfigError("data.val_fraction", self.val_fraction, "a fraction in (0, 0.5]")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 turns it off

    def __post_init__(self):
        _check_positive("optim", self, ("lr",))
        _check_positive("optim", self, ("warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio"),
                        allow_zero=True)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}", getattr(self, name), "a number in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop: steps, batch, evaluation, checkpoints."""

    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, across all micro-batches
    grad_accum: int = 1  # micro-batches per step
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    sample_tokens: int = 200  # generated after training; 0 skips the sample
    sample_prompt: str = "\n"

    def __post_init__(self):
        _check_positive("train", self, ("steps", "batch_size", "grad_accum", "eval_every",
                                        "eval_batches", "checkpoint_every", "keep_checkpoints"))
        _check_positive("train", self, ("sample_tokens", "seed"), allow_zero=True)
        if self.batch_size % self.grad_accum:
            raise ConfigError("train.grad_accum", self.grad_accum,
                              f"a divisor of train.batch_size={self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh sizes, axes in the fixed order of `sharding.axes.MESH_AXES`."""

    data: int = 1
    fsdp: int = 1
    pipeline: int = 1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1
    rules: str = "dp"
    # Pipeline parallelism (used when pipeline > 1).
    pp_schedule: str = "gpipe"  # gpipe | 1f1b
    pp_microbatches: int = 4
    # Multi-host: None/1 = this process only; else jax.distributed.initialize(coordinator, ...)
    # (the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment also works).
    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int = 1
    process_id: int | None = None

    def __post_init__(self):
        from sharding.rules import PIPELINE_HINT, PRESETS as RULE_PRESETS

        _check_positive("mesh", self, ("data", "fsdp", "pipeline", "expert", "sequence", "tensor",
                                       "pp_microbatches", "num_processes"))
        _check_choice("mesh.rules", self.rules, tuple(RULE_PRESETS), PIPELINE_HINT)
        _check_choice("mesh.pp_schedule", self.pp_schedule, ("gpipe", "1f1b"))
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ConfigError("mesh.process_id", self.process_id,
                              f"an integer in [0, mesh.num_processes={self.num_processes})")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.data, self.fsdp, self.pipeline, self.expert, self.sequence, self.tensor)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): W + (alpha / rank) * A @ B on the target weights.

    rank 0 turns LoRA off. Targets are comma-separated weight names of the blocks:
    wq, wk, wv, wo (attention), w_in, w_gate, w_out (feed-forward).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: str = "wq,wk,wv,wo"

    def __post_init__(self):
        _check_positive("lora", self, ("rank",), allow_zero=True)
        _check_positive("lora", self, ("alpha",))
        allowed = ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out")
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        bad = [t for t in names if t not in allowed]
        if bad or not names:
            raise ConfigError("lora.targets", self.targets,
                              "comma-separated names from " + ", ".join(allowed))

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """Sampling: temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off.
    fused_matvec: `generate`'s token loop runs fused matrix-vector kernels (llmjax.decode.fused)
    where they apply (a GPU, a dense Llama-family model in half precision, batch 1); False keeps
    XLA's.
    persistent_step: the token loop runs each step as one persistent kernel
    (llmjax.decode.persistent) where it applies (as fused_matvec, in bfloat16, with heads of 64 in
    GQA groups of an even size, as Llama 1.1B's and Llama 3.2 1B's), before fused_matvec. On by
    default: the faster of the two (batch 1 on an H100, ms/token: Llama 1.1B 0.959 vs 1.047,
    Llama 3.2 1B 1.002 vs 1.062, benchmarks/NOTES.md; its Mosaic GPU kernel has not been timed on
    an H200). It needs every SM of the GPU (not an MPS share of them). Both False: XLA's layers."""

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    fused_matvec: bool = True
    persistent_step: bool = True

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k", "seed"):  # a float here would be truncated downstream
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"decode.{name}", value, "an integer")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real):
            raise ConfigError("decode.temperature", self.temperature, "a finite number >= 0")
        _check_positive("decode", self, ("max_new_tokens",))
        _check_positive("decode", self, ("temperature", "top_k", "seed"), allow_zero=True)
        if 0 < self.temperature < TINIEST_TEMPERATURE:
            raise ConfigError("decode.temperature", self.temperature,
                              f"0 (greedy) or >= {TINIEST_TEMPERATURE:.4g} (float32's smallest normal)")
        if not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ConfigError("decode.top_p", self.top_p, "a number in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything a run needs; written to runs/<name>/config.yaml."""

    name: str = "run"
    out_dir: str = "runs"
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if not self.name or self.name in (".", "..") or "/" in self.name:  # the run's folder under out_dir
            raise ConfigError("name", self.name, "a non-empty folder name without '/'")
        if self.data.seq_len is None:  # resolve once, so the saved config is explicit
            object.__setattr__(self, "data", dataclasses.replace(self.data, seq_len=self.model.max_seq_len))
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"at most model.max_seq_len={self.model.max_seq_len}")
        if math.prod(self.mesh.shape) > 1:
            from sharding.mesh import check_divisibility

            try:
                check_divisibility(self.model, self.mesh, self.train.batch_size // self.train.grad_accum,
                                   seq_len=self.data.seq_len, rules=self.mesh.rules)
            except ValueError as e:
                raise ConfigError("mesh", self.mesh.shape, f"sizes that divide what they shard: {e}") from e

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ---------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides.

def _all_keys(cls, prefix="") -> list[str]:
    """Every dotted leaf key of a config class ("model.n_layers", ...)."""
    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += _all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check (YAML) or parse (CLI strings) `value` as `typ`; raise ConfigError if impossible."""
    optional = typing.get_origin(typ) in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, value, "true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, value, "an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, value, "a number")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, value, "a string")
    raise TypeError(f"unsupported config field type {typ} for {key}")


def build_config(cls, raw: dict, prefix: str = ""):
    """An instance of config dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", raw, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in names:
            candidates = [prefix + n for n in names] + _all_keys(ExperimentConfig)
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
            raise ConfigError(key, value, f"keys of {cls.__name__}: {', '.join(sorted(names))}",
                              close[0] if close else None)
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = build_config(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any):
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(key, value, f"a nested key, but {p} is a value")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """Turn ["model.n_layers=4", "train.steps=10"] into a nested dict of strings. A key given
    twice takes its last value, as a repeated command-line option does: a base list of
    overrides followed by a variant's is how scripts and tests build configs."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, None, "overrides of the form key=value, e.g. model.n_layers=4")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_dicts(base: dict, extra: dict) -> dict:
    """`base` updated by `extra`, nested dicts merged key by key (extra wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict) -> ExperimentConfig:
    """Build a validated ExperimentConfig from a nested dict (YAML-shaped), applying `preset`."""
    return build_config(ExperimentConfig, with_preset(raw))


def with_preset(raw: dict) -> dict:
    """A copy of a YAML-shaped dict whose `model` section sits on top of its named `preset`
    (the preset fills what the section leaves out).

    Raises:
      ConfigError: an unknown preset name (the closest known one suggested).
    """
    from llmjax.presets import PRESETS

    raw = dict(raw or {})
    preset = raw.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), PRESETS, n=1)
            raise ConfigError("preset", preset, "one of " + ", ".join(PRESETS), close[0] if close else None)
        raw["model"] = merge_dicts(PRESETS[preset], raw.get("model") or {})
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML file (optional) and apply dotted `key=value` overrides.

    Raises:
      ConfigError: missing file, unknown key, wrong type, impossible combination.
    """
    raw = read_yaml_config(path) if path is not None else {}
    return config_from_dict(merge_dicts(raw, parse_overrides(list(overrides))))


def read_yaml_config(path: str | Path) -> dict:
    """A --config file's contents: a YAML mapping (empty file: {}).

    Raises:
      ConfigError: a missing file, invalid YAML, or YAML that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", str(path), "an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("--config", str(path), f"valid YAML ({' '.join(str(e).split())})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError("--config", str(path), f"a YAML mapping of keys to values; got a {type(raw).__name__}")
    return raw or {}


def config_to_dict(cfg) -> dict:
    """The resolved config as plain data (what runs/<name>/config.yaml holds)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path):
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
