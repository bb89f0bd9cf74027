"""Logical-axis rule presets: one table per parallelism layout (MaxText's idea, no fallback chains).

A `Rules` table maps every logical name of `sharding.axes.LOGICAL_AXES` to a mesh axis,
a tuple of mesh axes (the dimension is split over their product), or None (replicated).
Weights and activations carry different names, so FSDP is one row (`embed` -> fsdp)
beside the batch row (`batch` -> (data, fsdp)).

Presets (the mesh sizes say how many ways; a size-1 axis is a no-op):
  dp       params replicated, batch over (data, fsdp).
  fsdp     ZeRO-3 (Rajbhandari et al. 2020): every weight's `embed` dim over fsdp, so
           params, grads and optimizer state are all split; XLA all-gathers per layer.
  zero1    ZeRO-1: params and grads replicated, optimizer state split like fsdp's
           (`OPT_STATE_PRESETS`), so the update runs on 1/N of each tensor.
  tp       Megatron tensor parallel (Shoeybi et al. 2019): heads, kv_heads, mlp and vocab
           over tensor (column-parallel in, row-parallel out), embed not split.
  fsdp_tp  tp plus embed over fsdp (2-D: ZeRO-3 across, Megatron within).
  sp       tp plus Megatron sequence parallel (Korthikanti et al. 2022, section 4.2.2):
           the residual stream between blocks (norms, dropout) is split along length
           over tensor; XLA turns each all-reduce into reduce-scatter + all-gather.
  cp       context parallel: activations' length over sequence, params ZeRO-3 over fsdp
           (replicated along sequence: splitting `embed` over (fsdp, sequence) makes XLA
           replicate the embedding lookup's output, seen on jax 0.11.2). Attention sees
           keys all-gathered along length by XLA, so causal masking is exact (the mask is
           built from global positions).
  ep       expert parallel: MoE experts over expert (each device holds n_experts / expert of
           them; the MoE layer exchanges tokens by all-to-all), the batch over
           (data, fsdp, expert) so the expert devices also split the dense work, weights'
           `embed` over fsdp (ZeRO-3 when mesh.fsdp > 1).
"""
from __future__ import annotations

import difflib

from sharding.axes import (ACT_HEADS, ACT_MLP, ACT_VOCAB, BATCH, EMBED, EXPERTS, HEADS, KV_HEADS,
                           LENGTH, LOGICAL_AXES, MESH_AXES, MLP, VOCAB)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

_BATCH_AXES = ("data", "fsdp")


def _table(**mesh_axes_by_name: MeshAxes) -> Rules:
    """A full table: names not given are replicated (None); rows in LOGICAL_AXES order."""
    unknown = set(mesh_axes_by_name) - set(LOGICAL_AXES)
    assert not unknown, unknown  # a typo in this file, not a user error
    return tuple((name, mesh_axes_by_name.get(name)) for name in LOGICAL_AXES)


_TP = {HEADS: "tensor", KV_HEADS: "tensor", MLP: "tensor", VOCAB: "tensor",
       ACT_HEADS: "tensor", ACT_MLP: "tensor", ACT_VOCAB: "tensor"}

PIPELINE_HINT = "for pipeline stages, keep a preset and set mesh.pipeline > 1"  # there is no `pp` preset
PRESETS: dict[str, Rules] = {
    "dp": _table(**{BATCH: _BATCH_AXES}),
    "fsdp": _table(**{EMBED: "fsdp", BATCH: _BATCH_AXES}),
    "zero1": _table(**{BATCH: _BATCH_AXES}),
    "tp": _table(**_TP, **{BATCH: _BATCH_AXES}),
    "fsdp_tp": _table(**_TP, **{EMBED: "fsdp", BATCH: _BATCH_AXES}),
    "sp": _table(**_TP, **{BATCH: _BATCH_AXES, LENGTH: "tensor"}),
    "cp": _table(**{EMBED: "fsdp", BATCH: _BATCH_AXES, LENGTH: "sequence"}),
    "ep": _table(**{EXPERTS: "expert", EMBED: "fsdp", BATCH: (*_BATCH_AXES, "expert")}),
}

# Presets whose optimizer state is laid out unlike their params; the rest use PRESETS.
OPT_STATE_PRESETS: dict[str, Rules] = {
    "zero1": _table(**{EMBED: "fsdp", BATCH: _BATCH_AXES}),
}

def _unknown_preset(name) -> ValueError:
    close = difflib.get_close_matches(str(name), PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"mesh.rules={name!r} is not a rule preset; use one of "
                      f"{', '.join(PRESETS)}{hint}; {PIPELINE_HINT}")


def get_rules(name: str) -> Rules:
    """The rule table of preset `name` (params and activations).

    Raises:
      ValueError: unknown preset name (the message lists the presets and the closest one).
    """
    if name not in PRESETS:
        raise _unknown_preset(name)
    return PRESETS[name]


def get_opt_state_rules(name: str) -> Rules:
    """The rule table for preset `name`'s optimizer state (its param table unless it differs).

    Raises:
      ValueError: unknown preset name.
    """
    return OPT_STATE_PRESETS.get(name) or get_rules(name)


def mesh_axes_of(mesh_axes: MeshAxes) -> tuple[str, ...]:
    """A rule's right-hand side as a tuple of mesh-axis names (() for None)."""
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def validate_rules(rules: Rules, *, what: str = "rules") -> dict[str, MeshAxes]:
    """Check a rule table and return it as a dict.

    A valid table has exactly one row per logical name of `LOGICAL_AXES` (no fallback
    chains), and each right-hand side is None, a mesh axis, or a tuple of distinct ones.

    Raises:
      ValueError: not a table of pairs, unknown or repeated logical name, a missing name,
        an unknown or repeated mesh axis; the message names the row.
    """
    table: dict[str, MeshAxes] = {}
    for row in rules:
        if not (isinstance(row, (tuple, list)) and len(row) == 2):
            raise ValueError(f"{what}: each row must be (logical name, mesh axes), got {row!r}")
        name, mesh_axes = row
        if name not in LOGICAL_AXES:
            close = difflib.get_close_matches(str(name), LOGICAL_AXES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{what}: logical name {name!r} is unknown; use one of "
                             f"{', '.join(LOGICAL_AXES)}{hint}")
        if name in table:
            raise ValueError(f"{what}: logical name {name!r} has two rows ({table[name]!r} and "
                             f"{mesh_axes!r}); fallback chains are not supported, keep one")
        axes = mesh_axes_of(mesh_axes)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"{what}: {name!r} -> {mesh_axes!r} names unknown mesh axis {bad[0]!r}; "
                             f"mesh axes are {', '.join(MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"{what}: {name!r} -> {mesh_axes!r} repeats a mesh axis")
        table[name] = mesh_axes
    missing = [n for n in LOGICAL_AXES if n not in table]
    if missing:
        raise ValueError(f"{what}: no row for logical name(s) {', '.join(missing)}; "
                         "give each one a mesh axis or None")
    return table


def resolve_rules(rules: str | Rules) -> tuple[Rules, Rules]:
    """(param rules, optimizer-state rules) from a preset name or a validated custom table.

    A custom table applies to the optimizer state as well.

    Raises:
      ValueError: unknown preset name or an invalid table (see `validate_rules`).
    """
    if isinstance(rules, str):
        return get_rules(rules), get_opt_state_rules(rules)
    validate_rules(rules)
    return tuple(tuple(r) for r in rules), tuple(tuple(r) for r in rules)
