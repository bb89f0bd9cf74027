"""Placement from logical names: activation constraints at block boundaries."""
import jax
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec


def logical_to_spec(names, rules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec with a rule table ((logical, mesh), ...)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """Constrain `x` to the sharding its logical `names` map to under the active rules.

    A no-op outside a mesh + `nnx.logical_axis_rules` context (unsharded use, notebooks).
    """
    rules = flax_spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))
