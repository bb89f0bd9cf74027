"""Device meshes from a mesh config, and the divisibility checks a layout needs before compiling.

The mesh always has the six axes of `sharding.axes.MESH_AXES`, in that order, size 1 where
unused, so one rule table works on any mesh. Configs are read by attribute (`cfg.fsdp`,
`model_cfg.n_heads`): this package imports nothing from llmjax.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.axes import (ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB, BATCH, EMBED, EXPERTS, HEAD_DIM,
                           HEADS, KV_HEADS, LAYERS, LENGTH, MESH_AXES, MLP, VOCAB)
from sharding.rules import Rules, mesh_axes_of, resolve_rules


def mesh_shape(cfg) -> dict[str, int]:
    """{axis: size} in MESH_AXES order from a config with one int attribute per mesh axis."""
    return {axis: int(getattr(cfg, axis)) for axis in MESH_AXES}


def _describe(shape: dict[str, int]) -> str:
    return " ".join(f"mesh.{axis}={size}" for axis, size in shape.items())


def make_mesh(cfg, devices=None, *, axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A `jax.sharding.Mesh` with axes MESH_AXES sized by `cfg` (a `MeshConfig`).

    Args:
      cfg: has int attributes data, fsdp, pipeline, expert, sequence, tensor.
      devices: the devices to lay out (default: all of `jax.devices()`).
      axis_type: `AxisType.Auto` (GSPMD propagation, the default) or `AxisType.Explicit`
        for every axis (flax cannot mix the two when it shards variables).
    Returns:
      Mesh of shape (data, fsdp, pipeline, expert, sequence, tensor).
    Raises:
      ValueError: a size below 1, or the product of sizes differs from the device count;
        the message names every axis size.
    """
    shape = mesh_shape(cfg)
    devices = list(jax.devices() if devices is None else devices)
    bad = {axis: size for axis, size in shape.items() if size < 1}
    if bad:
        raise ValueError(f"mesh sizes must be >= 1; got {_describe(shape)}")
    total = math.prod(shape.values())
    if total != len(devices):
        raise ValueError(f"mesh {_describe(shape)} has {total} slots (their product) but there are "
                         f"{len(devices)} devices; choose sizes whose product is {len(devices)}")
    types = (axis_type,) * len(MESH_AXES)
    if devices == jax.devices():
        # jax.make_mesh orders devices for the physical topology (NVLink / ICI rings).
        return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=types)
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    return Mesh(grid.reshape(tuple(shape.values())), MESH_AXES, axis_types=types)


def logical_sizes(model_cfg, batch_size: int, seq_len: int) -> dict[str, tuple[str, int]]:
    """{logical name: (dotted config key, size)} for the dims a rule table may split.

    `batch_size` is the sequences per micro-batch (train.batch_size // train.grad_accum).
    """
    sizes = {
        EMBED: ("model.d_model", model_cfg.d_model),
        HEADS: ("model.n_heads", model_cfg.n_heads),
        KV_HEADS: ("model.n_kv_heads", model_cfg.n_kv_heads),
        HEAD_DIM: ("model.head_dim", model_cfg.d_model // model_cfg.n_heads),
        MLP: ("model.d_mlp", model_cfg.d_mlp),
        VOCAB: ("model.vocab_size", model_cfg.vocab_size),
        LAYERS: ("model.n_layers", model_cfg.n_layers),
        BATCH: ("micro-batch size (train.batch_size // train.grad_accum)", batch_size),
        LENGTH: ("data.seq_len", seq_len),
        ACT_EMBED: ("model.d_model", model_cfg.d_model),
        ACT_HEADS: ("model.n_heads", model_cfg.n_heads),
        ACT_MLP: ("model.d_mlp", model_cfg.d_mlp),
        ACT_VOCAB: ("model.vocab_size", model_cfg.vocab_size),
    }
    if hasattr(model_cfg, "n_experts"):
        sizes[EXPERTS] = ("model.n_experts", model_cfg.n_experts)
    return sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_divisibility(model_cfg, mesh_cfg, batch_size: int, *, seq_len: int | None = None,
                       rules: str | Rules | None = None) -> None:
    """Check before compiling that every dim the rules split divides evenly, and that no
    mesh axis of size > 1 is left unused (its devices would only repeat work).

    Args:
      model_cfg: a `ModelConfig` (d_model, n_heads, n_kv_heads, d_mlp, vocab_size, n_layers).
      mesh_cfg: a `MeshConfig` (axis sizes and `rules`, the preset name).
      batch_size: sequences per micro-batch (train.batch_size // train.grad_accum).
      seq_len: tokens per sequence fed to the model (default model.max_seq_len).
      rules: overrides `mesh_cfg.rules` (a preset name or a table).
    Raises:
      ValueError: an indivisible dim (names the config key, its value, the mesh axes and
        the sizes that would work), a pipeline size not dividing model.n_layers, or an
        unused mesh axis of size > 1.
    """
    shape = mesh_shape(mesh_cfg)
    rules = mesh_cfg.rules if rules is None else rules
    label = rules if isinstance(rules, str) else "custom"
    seq_len = model_cfg.max_seq_len if seq_len is None else seq_len
    sizes = logical_sizes(model_cfg, batch_size, seq_len)
    used = {"pipeline"}  # the pipeline step splits layers over it (sharding/pipeline.py), not a rule
    for table in dict.fromkeys(resolve_rules(rules)):  # params, then opt state if different
        for name, mesh_axes in table:
            axes = mesh_axes_of(mesh_axes)
            used.update(axes)
            ways = math.prod(shape[a] for a in axes)
            if ways == 1 or name not in sizes:
                continue
            key, size = sizes[name]
            if size % ways:
                fits = [d for d in _divisors(size) if d <= ways]
                axes_desc = " x ".join(f"mesh.{a}={shape[a]}" for a in axes)
                axes_desc += f" = {ways}" if len(axes) > 1 else ""
                raise ValueError(f"{key}={size} is not divisible by {axes_desc}: rules "
                                 f"{label!r} split {name!r} over {mesh_axes}; use a size dividing "
                                 f"{size} (e.g. {fits[-3:]}) or change {key}")
    if shape["pipeline"] > 1 and model_cfg.n_layers % shape["pipeline"]:
        raise ValueError(f"model.n_layers={model_cfg.n_layers} is not divisible by "
                         f"mesh.pipeline={shape['pipeline']} (each stage holds n_layers / pipeline "
                         f"layers); use mesh.pipeline in {_divisors(model_cfg.n_layers)}")
    unused = [a for a, size in shape.items() if size > 1 and a not in used]
    if unused:
        raise ValueError(f"rules {label!r} split nothing over "
                         f"{', '.join(f'mesh.{a}={shape[a]}' for a in unused)}; those devices would "
                         f"repeat the same work: set them to 1 or pick rules that use them")
