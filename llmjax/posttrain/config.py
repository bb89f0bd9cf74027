"""Post-training run configuration: YAML (experiments/configs/{sft,dpo,rlhf,qlora}*.yaml)
plus dotted `key=value` overrides, resolved as in `llmjax.config` (defaults < preset <
YAML < CLI). Errors are `ConfigError`s naming the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmjax.config import (
    ConfigError,
    _check_positive,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    build_config,
    merge_dicts,
    parse_overrides,
    read_yaml_config,
    with_preset,
)

REWARDS = ("model", "target_token")


@dataclass(frozen=True, kw_only=True)
class PosttrainConfig:
    """One post-training run. `init_from` names a pretraining run folder (runs/<name>) whose
    newest model is the starting point (and its tokenizer is used); else the model is
    freshly initialized from `model.*` and `tokenizer`."""

    name: str = "posttrain"
    out_dir: str = "runs"
    preset: str | None = None
    init_from: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tokenizer: str = "bytes"
    corpus: str = "shakespeare"
    n_examples: int = 256  # generated examples (SFT) or preference pairs (DPO, reward model)
    val_fraction: float = 0.125
    seq_len: int = 128
    pack: bool = True  # SFT: pack several examples per row
    steps: int = 60
    batch_size: int = 8
    eval_every: int = 20
    seed: int = 0
    beta: float = 0.1  # DPO temperature; GRPO KL coefficient
    qlora: bool = False  # 4-bit frozen base (needs lora.rank >= 1)
    qlora_block: int = 64
    # RLHF
    rm_steps: int = 60
    reward: str = "model"  # model: the trained reward model; target_token: fraction of `target_token`
    target_token: int = 101  # "e" in the byte tokenizer
    prompt_tokens: int = 48  # rollout prompts: the last this many tokens of each templated prompt
    prompts_per_iter: int = 4
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    clip_eps: float = 0.2

    def __post_init__(self):
        _check_positive("", self, ("n_examples", "seq_len", "steps", "batch_size", "eval_every", "rm_steps",
                                   "prompt_tokens", "prompts_per_iter", "group_size", "max_new_tokens",
                                   "qlora_block"))
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError("val_fraction", self.val_fraction, "a fraction in (0, 0.5]")
        _check_positive("", self, ("beta",), allow_zero=True)
        _check_positive("", self, ("temperature", "clip_eps"))
        if self.reward not in REWARDS:
            raise ConfigError("reward", self.reward, "one of " + ", ".join(REWARDS))
        if self.reward == "target_token" and not 0 <= self.target_token < self.model.vocab_size:
            raise ConfigError("target_token", self.target_token,
                              f"a token id in [0, model.vocab_size={self.model.vocab_size})")
        if self.qlora and self.lora.rank < 1:
            raise ConfigError("lora.rank", self.lora.rank, "at least 1 with qlora=true (QLoRA trains adapters)")
        if self.prompt_tokens + self.max_new_tokens > self.model.max_seq_len:
            raise ConfigError("prompt_tokens", self.prompt_tokens, f"at most model.max_seq_len="
                              f"{self.model.max_seq_len} - max_new_tokens={self.max_new_tokens}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError("seq_len", self.seq_len, f"at most model.max_seq_len={self.model.max_seq_len}")
        if self.group_size < 2:
            raise ConfigError("group_size", self.group_size, "at least 2 (advantages are relative to the group)")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_posttrain_config(path=None, overrides=()) -> PosttrainConfig:
    """Read a YAML file (optional) and apply `key=value` overrides.

    Raises:
      ConfigError: missing file, unknown key, wrong type, impossible combination.
    """
    raw = read_yaml_config(path) if path is not None else {}
    raw = merge_dicts(raw, parse_overrides(list(overrides)))
    return build_config(PosttrainConfig, with_preset(raw))
