"""Placement from logical names: activation constraints, and shardings for a train state or batch.

A train state is {"params": nested dict, "opt_state": optax state, "step": scalar}. Params
take their logical names from the model's graphdef (set by `nnx.with_partitioning`);
optimizer-state leaves that mirror a param (Adam's mu and nu) take that param's names
under the optimizer-state rules; everything else (counts, the step) is replicated.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.axes import BATCH
from sharding.rules import Rules, mesh_axes_of, resolve_rules

Names = tuple  # logical names of one array's dims: str or None per dim


def logical_to_spec(names: Names, rules: Rules | Mapping) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec under a rule table.

    Args:
      names: one logical name (or None) per array dimension.
      rules: ((logical name, mesh axes), ...) or the same as a dict.
    Returns:
      PartitionSpec with one entry per dimension.
    Raises:
      ValueError: a name that is not a string (model code must use `sharding.axes`
        constants), a name with no rule, or a mesh axis used by two dimensions.
    """
    table = rules if isinstance(rules, Mapping) else dict(rules)
    entries, used = [], {}
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if not isinstance(name, str):
            raise ValueError(f"logical name {name!r} (dim {dim} of {tuple(names)}) is not a string; "
                             "name dimensions with the constants of sharding.axes")
        if name not in table:
            raise ValueError(f"logical name {name!r} has no rule; the rules cover {', '.join(table)}")
        for axis in mesh_axes_of(table[name]):
            if axis in used:
                raise ValueError(f"mesh axis {axis!r} would shard two dims of {tuple(names)} "
                                 f"({used[axis]!r} and {name!r}); a PartitionSpec uses each axis once")
            used[axis] = name
        entries.append(table[name])
    return PartitionSpec(*entries)


def active_layout():
    """(abstract mesh, {logical name: mesh axes}) of the enclosing `jax.set_mesh` +
    `nnx.logical_axis_rules` context, or None outside one (unsharded use, notebooks).

    Model code asks this which mesh axes a logical name maps to, never naming a mesh axis.
    """
    rules = flax_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    return mesh, dict(rules)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Constrain `x` to the sharding its logical `names` map to under the active rules.

    A no-op outside a mesh + `nnx.logical_axis_rules` context (unsharded use, notebooks).
    """
    layout = active_layout()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, layout[1]))


def _path_keys(path) -> tuple:
    """A jax key path as plain keys: (DictKey('a'), SequenceKey(0)) -> ('a', 0)."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _path_str(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def param_logical_names(graphdef, params) -> dict[tuple, Names]:
    """The logical names of every param, read from the model's variable metadata.

    Args:
      graphdef: the model's `nnx.GraphDef` (from `nnx.split` / `split_model`).
      params: the matching nested dict of arrays or `jax.ShapeDtypeStruct`s.
    Returns:
      {path tuple ("blocks", "attn", "wq"): names ("layers", "embed", "heads", "head_dim")};
      an unnamed param gets None for every dim.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    with nnx.use_eager_sharding(False):  # rebuild the module without placing anything
        model = nnx.merge(graphdef, abstract)
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        dims = var.get_metadata().get("out_sharding")
        names[tuple(path)] = tuple(dims) if dims else (None,) * len(var.shape)
    return names


def _ways(mesh: Mesh, mesh_axes) -> int:
    """How many pieces `mesh_axes` (a PartitionSpec entry) split a dim into on `mesh`."""
    missing = [a for a in mesh_axes_of(mesh_axes) if a not in mesh.shape]
    if missing:
        raise ValueError(f"the rules use mesh axis {missing[0]!r}, but the mesh has axes "
                         f"{tuple(mesh.axis_names)}; build it with sharding.mesh.make_mesh")
    return math.prod(mesh.shape[a] for a in mesh_axes_of(mesh_axes))


def _sharding(mesh: Mesh, keys: tuple, shape: tuple, names: Names, rules: Rules) -> NamedSharding:
    """NamedSharding of one array, checking that each split dim divides evenly."""
    spec = logical_to_spec(names, rules)
    for dim, (size, mesh_axes) in enumerate(zip(shape, spec)):
        ways = _ways(mesh, mesh_axes)
        if size % ways:
            raise ValueError(f"{_path_str(keys)} {tuple(shape)}: dim {dim} ({names[dim]}={size}) is "
                             f"split over {mesh_axes} of size {ways}, which does not divide {size}")
    return NamedSharding(mesh, spec)


def param_shardings(params, names: dict[tuple, Names], mesh: Mesh, rules: Rules):
    """NamedShardings for a params tree (arrays or ShapeDtypeStructs) from its logical names.

    Raises:
      ValueError: a param without names, a bad name, or a dim its mesh axes do not divide.
    """
    def one(path, x):
        keys = _path_keys(path)
        if keys not in names:
            raise ValueError(f"param {_path_str(keys)} is not in the model's graphdef")
        return _sharding(mesh, keys, np.shape(x), names[keys], rules)

    return jax.tree_util.tree_map_with_path(one, params)


def opt_state_shardings(opt_state, params, names: dict[tuple, Names], mesh: Mesh, rules: Rules):
    """NamedShardings for an optimizer state: a leaf whose key path ends with a param's path
    and has its shape is laid out like that param under `rules`; other leaves replicate."""
    shapes = {keys: np.shape(x) for keys, x in
              ((_path_keys(p), x) for p, x in jax.tree_util.tree_leaves_with_path(params))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        keys = _path_keys(path)
        for start in range(len(keys)):  # longest suffix first
            tail = keys[start:]
            if tail in shapes and shapes[tail] == np.shape(x):
                return _sharding(mesh, keys, np.shape(x), names[tail], rules)
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state)


def state_shardings(graphdef, state: dict, mesh: Mesh, rules: str | Rules) -> dict:
    """NamedShardings for a train state {"params", "opt_state", "step", ...}.

    Args:
      graphdef: the model's graphdef (carries the params' logical names).
      state: the state, or its `jax.eval_shape` (ShapeDtypeStructs are enough).
      mesh: the device mesh.
      rules: a preset name of `sharding.rules.PRESETS` (its optimizer-state table applies
        to "opt_state", e.g. zero1) or a custom table (used for both).
    Returns:
      A tree like `state` of NamedShardings; keys other than params/opt_state replicate.
    Raises:
      ValueError: unknown preset, invalid table, or a dim its mesh axes do not divide.
    """
    return state_shardings_from_tables(graphdef, state, mesh, *resolve_rules(rules))


def state_shardings_from_tables(graphdef, state: dict, mesh: Mesh, param_rules: Rules,
                                opt_rules: Rules) -> dict:
    """`state_shardings` with the params' and the optimizer state's rule tables given."""
    names = param_logical_names(graphdef, state["params"])
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {key: jax.tree.map(lambda _: replicated, value) for key, value in state.items()}
    out["params"] = param_shardings(state["params"], names, mesh, param_rules)
    if "opt_state" in state:
        out["opt_state"] = opt_state_shardings(state["opt_state"], state["params"], names, mesh, opt_rules)
    return out


def batch_sharding(mesh: Mesh, rules: str | Rules, ndim: int = 3) -> NamedSharding:
    """Sharding of a token batch: [grad_accum, micro_batch, T + 1] (ndim 3) or [batch, T + 1]
    (ndim 2), split on its batch axis as the rules' `batch` row says; the rest replicated."""
    param_rules, _ = resolve_rules(rules)
    batch_axes = dict(param_rules)[BATCH]
    spec = [None] * ndim
    spec[ndim - 2] = batch_axes
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_ways(mesh: Mesh, rules: str | Rules) -> int:
    """Devices a batch is split over: the product of the mesh axes in the rules' `batch` row."""
    return math.prod(mesh.shape[a] for a in mesh_axes_of(dict(resolve_rules(rules)[0])[BATCH]))


def shard_state(state: dict, graphdef, mesh: Mesh, rules: str | Rules) -> dict:
    """Place an existing train state (e.g. built unsharded, or restored) on the mesh.

    Raises:
      ValueError: as `state_shardings`.
    """
    return jax.device_put(state, state_shardings(graphdef, state, mesh, rules))


def shard_batch(batch, mesh: Mesh, rules: str | Rules) -> jax.Array:
    """Place a token batch [grad_accum, micro_batch, T + 1] or [batch, T + 1] on the mesh.

    Raises:
      ValueError: the batch axis is not divisible by its mesh axes' size.
    """
    sharding = batch_sharding(mesh, rules, np.ndim(batch))
    ways = _ways(mesh, sharding.spec[np.ndim(batch) - 2])
    size = np.shape(batch)[np.ndim(batch) - 2]
    if size % ways:
        raise ValueError(f"batch of shape {np.shape(batch)}: micro-batch size {size} is not divisible "
                         f"by the {ways} devices its batch axis is split over ({sharding.spec})")
    return jax.device_put(batch, sharding)


def format_shardings(tree, shardings) -> str:
    """One line per leaf, "path  shape  spec": the printable layout of a state."""
    lines = []
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        lines.append(f"{jax.tree_util.keystr(path, simple=True, separator='/'):<40} "
                     f"{str(tuple(np.shape(x))):<18} {s.spec}")
    return "\n".join(lines)


class ShardedStep:
    """A step jitted with explicit in/out shardings, traced under the mesh and the rule table
    (so the model's activation constraints apply), built on the first call from the argument
    shapes and cached per shape.

    make_shardings(*args) -> (in_shardings, out_shardings); make_fn(in_shardings, *args) ->
    the function to jit. Call the step like the jitted function; `lower(*args)` gives the
    lowered program (for `.compile().memory_analysis()`), `shardings(*args)` the shardings.
    """

    def __init__(self, make_fn, make_shardings, mesh: Mesh, rules: Rules, donate_argnums=()):
        self._make_fn, self._make_shardings = make_fn, make_shardings
        self.mesh, self.rules, self._donate = mesh, rules, donate_argnums
        self._cache = {}

    def _context(self):
        ctx = contextlib.ExitStack()
        ctx.enter_context(jax.set_mesh(self.mesh))
        ctx.enter_context(nnx.logical_axis_rules(self.rules))
        return ctx

    def shardings(self, *args):
        """(in_shardings, out_shardings) for these arguments (arrays or ShapeDtypeStructs)."""
        return self._make_shardings(*args)

    def _jitted(self, args):
        key = jax.tree.structure(args), tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(args))
        if key not in self._cache:
            in_shardings, out_shardings = self._make_shardings(*args)
            self._cache[key] = jax.jit(self._make_fn(in_shardings, *args), in_shardings=in_shardings,
                                       out_shardings=out_shardings, donate_argnums=self._donate)
        return self._cache[key]

    def __call__(self, *args):
        with self._context():
            return self._jitted(args)(*args)

    def lower(self, *args):
        with self._context():
            return self._jitted(args).lower(*args)
