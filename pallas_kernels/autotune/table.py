"""The committed tuning table and the lookup the kernels call.

table.json maps device -> kernel -> shape key -> {"config": {field: value}, timings}. A kernel
asks `best_config(kernel, key, default)`, where `default` is its heuristic config (a frozen
dataclass): it gets the default with the table's fields applied, or the default itself when the
table has no entry for this device (or another device on its chip, `CHIP_FAMILIES`) and shape
(always so on CPU). Shape keys come from the `*_key` functions below, so the tuner and the
kernels agree on them; sizes are bucketed to the next power of two, so a shape near a tuned one
shares its entry.
"""
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re

import jax
import jax.numpy as jnp

TABLE = pathlib.Path(__file__).with_name("table.json")

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def device_key(device_kind: str | None = None) -> str:
    """The table's name for a device: its device_kind in lower snake case
    ("NVIDIA H100 80GB HBM3" -> "nvidia_h100_80gb_hbm3"); default: the first local device."""
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


def _bucket(n: int) -> int:
    """n rounded up to a power of two (>= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def shape_key(**dims) -> str:
    """"name=value,..." in the order given; dtypes by name."""
    parts = []
    for name, value in dims.items():
        if isinstance(value, (type, jnp.dtype)) or hasattr(value, "dtype"):
            value = jnp.dtype(value).name
        parts.append(f"{name}={value}")
    return ",".join(parts)


def matmul_key(m: int, n: int, k: int, dtype) -> str:
    """Key of an [m, k] @ [k, n] matmul with inputs of `dtype`."""
    return shape_key(m=_bucket(m), n=_bucket(n), k=_bucket(k), dtype=jnp.dtype(dtype).name)


def flash_attention_key(seq_q: int, seq_kv: int, head_dim: int, causal: bool, dtype) -> str:
    """Key of a flash-attention call (batch and heads only scale the grid; left out)."""
    return shape_key(t=_bucket(seq_q), s=_bucket(seq_kv), h=head_dim, causal=bool(causal),
                     dtype=jnp.dtype(dtype).name)


def norms_key(fn: str, rows: int, hidden: int, dtype) -> str:
    """Key of a norm call: fn one of rms_norm, layer_norm, rms_norm_residual, layer_norm_residual."""
    return shape_key(fn=fn, rows=_bucket(rows), hidden=hidden, dtype=jnp.dtype(dtype).name)


@functools.cache
def _load_cached(path: str, mtime: float) -> dict:
    del mtime  # part of the cache key only: a rewritten table is read again
    return json.loads(pathlib.Path(path).read_text())


def load(path=None) -> dict:
    """The whole table ({} when the file does not exist); path None: the committed TABLE."""
    path = pathlib.Path(TABLE if path is None else path)
    if not path.exists():
        return {}
    return _load_cached(str(path), os.path.getmtime(path))


# Devices built on one chip share tuned tiles: same SMs, shared memory and clocks, they differ in
# memory size and bandwidth. A device with no entry of its own for a kernel and shape takes a
# sibling's, matched by device-key prefix. Measured: the H100 with the H200's flash entries, D 64
# full forward 1k 353 -> 437 TFLOP/s, 16k 441 -> 524 (benchmarks/NOTES.md, fifteenth session).
CHIP_FAMILIES = (("nvidia_h100", "nvidia_h200", "nvidia_gh200"),)  # GH100 (Hopper)


def siblings(device: str, devices) -> list[str]:
    """The devices among `devices` (table keys) on the same chip as `device`, itself excluded."""
    family = next((f for f in CHIP_FAMILIES if device.startswith(f)), ())
    return [d for d in devices if d != device and d.startswith(family)] if family else []


def lookup(kernel: str, key: str, *, device_kind: str | None = None, path=None) -> dict | None:
    """The table entry for (device, kernel, key), else a sibling device's (`CHIP_FAMILIES`), or None."""
    entries = load(path)
    device = device_key(device_kind)
    for name in (device, *siblings(device, entries)):
        entry = entries.get(name, {}).get(kernel, {}).get(key)
        if entry is not None:
            return entry
    return None


def config_fields(config) -> dict:
    """A config dataclass as JSON-ready fields (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def apply_fields(config, fields: dict):
    """`config` with `fields` replaced; a dict value for a dataclass field is applied to it in
    turn. Raises ValueError naming an unknown field (and the config's own checks' errors)."""
    known = {f.name for f in dataclasses.fields(config)}
    changes = {}
    for name, value in fields.items():
        if name not in known:
            raise ValueError(f"{type(config).__name__} has no field {name!r}; fields: {sorted(known)}")
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = apply_fields(current, value)
        changes[name] = value
    return dataclasses.replace(config, **changes)


def on_gpu() -> bool:
    """Whether lookups for the local device consult the table (it holds GPU measurements only)."""
    return jax.default_backend() == "gpu"


def best_config(kernel: str, key: str, default, *, device_kind: str | None = None, path=None):
    """The tuned config for this kernel and shape key on this device, else `default`.

    Args:
      kernel: the table's kernel name ("matmul_triton", "flash_attention", "norms", ...).
      key: a shape key from matmul_key / flash_attention_key / norms_key.
      default: the heuristic config (a dataclass); the table's fields are applied to it.
      device_kind: look up another device's entries (tests); default: the first local device, and
        on a non-GPU backend always `default` (the table holds GPU measurements only).
      path: the table file (default: the committed TABLE).
    A stale entry (a field the config no longer has, a value its checks reject) gives `default`
    and one logged warning naming the kernel, key and reason.
    """
    if device_kind is None and not on_gpu():
        return default
    entry = lookup(kernel, key, device_kind=device_kind, path=path)
    if entry is None:
        return default
    try:
        return apply_fields(default, entry["config"])
    except (ValueError, TypeError, KeyError) as e:
        message = f"autotune: ignoring table entry {kernel} [{key}] in {path or TABLE}: {e}"
        if message not in _warned:
            _warned.add(message)
            _log.warning(message)
        return default


def record(entries: list[dict], *, device_kind: str | None = None, path=None) -> None:
    """Write tuning results (tuner.tune's dicts: kernel, key, best, timings) into the table,
    replacing entries with the same device, kernel and key; other entries are kept."""
    path = pathlib.Path(TABLE if path is None else path)
    table = json.loads(path.read_text()) if path.exists() else {}
    device = table.setdefault(device_key(device_kind), {})
    for result in entries:
        device.setdefault(result["kernel"], {})[result["key"]] = dict(
            config=result["best"], tuned_ms=result["tuned_ms"], default_ms=result["default_ms"],
            kept_default=result["kept_default"], date=result["date"], timer=result["timer"])
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a crash mid-write leaves the old table
