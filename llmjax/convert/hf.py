"""Import and export of Hugging Face checkpoints: config.json + safetensors, exact both ways.

`load_hf` / `load_hf_model` read a checkpoint folder (single `model.safetensors` or shards
with `model.safetensors.index.json`); `save_hf` writes one that `transformers` loads as
GPT2LMHeadModel or LlamaForCausalLM. The tensor mapping is in `hf_layout.py`, the
config.json mapping in `hf_config.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.config import ModelConfig
from llmjax.convert.hf_config import ConversionError, config_from_hf, config_to_hf
from llmjax.convert.hf_layout import expected_params, flatten, params_from_hf, params_to_hf
from llmjax.convert.safetensors_io import SafetensorsError, TensorRecord, read_header, write_safetensors
from llmjax.data.tokenizer import load_tokenizer
from llmjax.models import init_model, split_model

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_CODES = ("F32", "BF16", "F16")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
# Buffers some checkpoints carry that are not parameters (GPT-2's causal mask, old RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------
# Import.

def _checkpoint_dir(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConversionError(f"checkpoint path {str(path)!r} is a file; pass the folder that holds "
                              "config.json and the safetensors weights")
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json")
    return path


def _read_config(path: Path) -> dict:
    try:
        hf = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ConversionError(f"{path / 'config.json'} holds a {type(hf).__name__}, not a JSON object")
    return hf


def _read_sharded(path: Path, index: Path) -> dict[str, TensorRecord]:
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{index} is not a safetensors index with a 'weight_map': {e!r}") from e
    shards = {}
    for file in sorted(set(weight_map.values())):
        if not (path / file).is_file():
            raise ConversionError(f"{index} names shard {file!r}, which is not in {path}")
        shards[file] = read_header(path / file)[0]
    for name, file in weight_map.items():
        if name not in shards[file]:
            raise ConversionError(f"{index} maps tensor {name!r} to {file!r}, which does not hold it")
    return {name: shards[file][name] for name, file in weight_map.items()}


def _open_weights(path: Path) -> dict[str, TensorRecord]:
    """Every tensor of the checkpoint (headers only): single file, else sharded with an index."""
    try:
        if (path / WEIGHTS_FILE).is_file():
            return read_header(path / WEIGHTS_FILE)[0]
        if (path / INDEX_FILE).is_file():
            return _read_sharded(path, path / INDEX_FILE)
    except SafetensorsError as e:
        raise ConversionError(str(e)) from e
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    hint = f"; found {others}, but only safetensors weights under those names are read" if others else ""
    raise ConversionError(f"{path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")


def _fetch(records: dict[str, TensorRecord], name: str, shape: tuple[int, ...], where) -> np.ndarray:
    record = records.get(name)
    if record is None:
        raise ConversionError(f"tensor {name!r} is missing from {where}; expected shape {list(shape)}")
    if record.shape != shape:
        raise ConversionError(f"tensor {name!r} in {record.file.name} has shape {list(record.shape)}; "
                              f"expected shape {list(shape)} (from config.json)")
    if record.dtype not in FLOAT_CODES:
        raise ConversionError(f"tensor {name!r} in {record.file.name} has dtype {record.dtype}, which is "
                              f"not supported; supported: {', '.join(FLOAT_CODES)}")
    return record.load()


def _params_from_records(cfg: ModelConfig, records: dict[str, TensorRecord], where) -> dict:
    """llmjax params from the checkpoint's tensors; every tensor must find a place."""
    params, used = params_from_hf(cfg, lambda name, shape: _fetch(records, name, shape, where), records)
    leftover = {n for n in set(records) - used if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        leftover.discard("lm_head.weight")  # transformers ties it to the embedding too
    if leftover:
        raise ConversionError(f"{where} holds {len(leftover)} tensor(s) with no place in the {cfg.family} "
                              f"layout, e.g. {sorted(leftover)[:5]}; is config.json's model_type right?")
    return params


def load_hf(path: str | os.PathLike, *, dtype: str | None = None,
            param_dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face checkpoint folder into llmjax's config and parameters.

    The folder holds `config.json` and `model.safetensors`, or shards
    `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`.

    Args:
      path: the folder.
      dtype: compute dtype for the returned config; None keeps ModelConfig's default.
      param_dtype: "float32" or "bfloat16"; F32/BF16/F16 tensors are converted to it.
    Returns:
      (cfg, params): params is the nested dict `split_model(init_model(cfg))[1]` has, with
      numpy arrays in `param_dtype` and the stacked `blocks` layout ([L, ...]).
    Raises:
      ConversionError: the path does not exist or lacks files; unknown model_type or
        unsupported config field; a tensor missing, of the wrong shape (the message names
        it and the expected shape), of an unsupported dtype, or left over.
    """
    path = _checkpoint_dir(path)
    cfg = config_from_hf(_read_config(path), dtype=dtype, param_dtype=param_dtype)
    return cfg, _params_from_records(cfg, _open_weights(path), path)


def load_hf_model(path: str | os.PathLike, *, dtype: str | None = None, param_dtype: str = "float32"):
    """A ready Transformer from a Hugging Face checkpoint folder, with its tokenizer.

    Args:
      path: the folder (config.json, safetensors weights, optionally tokenizer.json).
      dtype: compute dtype; None keeps ModelConfig's default.
      param_dtype: "float32" or "bfloat16".
    Returns:
      (cfg, model, tokenizer): the model unsharded on the default device (merged into a
      graphdef built without allocating); tokenizer from the folder's `tokenizer.json`, or
      None when it has none.
    Raises:
      ConversionError: as `load_hf`.
      TokenizerError: a tokenizer.json that cannot be loaded.
    """
    cfg, params = load_hf(path, dtype=dtype, param_dtype=param_dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_model(cfg)))
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    folder = Path(path).expanduser()
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return cfg, model, tokenizer


# ---------------------------------------------------------------------------------------
# Export.

def _check_params(cfg: ModelConfig, params: dict):
    expected = dict(flatten(expected_params(cfg)))
    got = dict(flatten(params))
    for path, leaf in expected.items():
        name = ".".join(path)
        if path not in got:
            raise ConversionError(f"params lack {name!r} (shape {list(leaf.shape)}) that this config needs")
        if tuple(got[path].shape) != leaf.shape:
            raise ConversionError(f"params {name!r} has shape {list(got[path].shape)}; "
                                  f"expected {list(leaf.shape)} for this config")
    if extra := sorted(".".join(p) for p in set(got) - set(expected)):
        raise ConversionError(f"params hold {extra[:5]}, which this config has no place for")


def _write_weights(path: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None):
    for old in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # a stale file would shadow (or mix with) the new ones
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(path / WEIGHTS_FILE, tensors, metadata)
        return
    shards, size = [{}], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / file, shard, metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def save_hf(cfg: ModelConfig, params, path: str | os.PathLike, tokenizer=None, *,
            dtype: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Writes a Hugging Face checkpoint folder that `transformers` loads as the same model.

    Writes `config.json` (GPT2LMHeadModel or LlamaForCausalLM) and `model.safetensors`, or
    shards of at most `max_shard_bytes` (one tensor may exceed it) with
    `model.safetensors.index.json`; old weight files of those names in `path` are removed.

    Args:
      cfg: the model config.
      params: the nested param dict (`split_model(model)[1]`) or the Transformer itself.
      path: the folder (created if needed).
      tokenizer: optional; anything with `.save(file)` (HFTokenizer) -> `tokenizer.json`.
      dtype: cast every tensor to this ("float32", "bfloat16", "float16"); None keeps them.
      max_shard_bytes: shard the weights above this size; None writes one file.
    Returns:
      The folder.
    Raises:
      ConversionError: params not matching cfg (names the leaf and expected shape), mixed or
        unsupported dtypes, a GPT-2 config with GQA, an MoE config, a tokenizer that cannot be saved.
    """
    if isinstance(params, nnx.Module):
        params = split_model(params)[1]
    if cfg.n_experts:
        raise ConversionError(f"model.n_experts={cfg.n_experts}: mixture-of-experts models have no "
                              "Hugging Face export yet (GPT2LMHeadModel and LlamaForCausalLM are dense)")
    if tokenizer is not None and not hasattr(tokenizer, "save"):
        raise ConversionError(f"tokenizer {type(tokenizer).__name__} has no .save(path); only HF "
                              "tokenizers can be written as tokenizer.json")
    params = jax.tree.map(np.asarray, params)  # device -> host once
    _check_params(cfg, params)
    tensors = params_to_hf(cfg, params)
    if dtype is not None:
        tensors = {k: t.astype(jnp.dtype(dtype)) for k, t in tensors.items()}
    dtypes = sorted({str(t.dtype) for t in tensors.values()})
    if len(dtypes) != 1 or dtypes[0] not in SAVE_DTYPES:
        raise ConversionError(f"params have dtype(s) {dtypes}; save_hf writes one of "
                              f"{list(SAVE_DTYPES)}: pass dtype= to cast")
    hf = config_to_hf(cfg, dtypes[0], eos_id=getattr(tokenizer, "eos_id", None))
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    _write_weights(path, tensors, max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save(path / "tokenizer.json")
    return path
