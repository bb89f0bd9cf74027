"""Building a model in the right sharding context, and counting its parameters."""
import contextlib

import jax
from flax import nnx

from llmjax.config import ModelConfig
from llmjax.models.transformer import Transformer


def init_model(cfg: ModelConfig, seed: int = 0, mesh=None, rules=None) -> Transformer:
    """A freshly initialized Transformer.

    Without a mesh the parameters are plain (unsharded) arrays; with `mesh` and `rules`
    ((logical name, mesh axis) pairs) each parameter is created sharded by its logical names.
    """
    if mesh is None:
        ctx = nnx.use_eager_sharding(False)
    else:
        ctx = contextlib.ExitStack()
        ctx.enter_context(jax.set_mesh(mesh))
        ctx.enter_context(nnx.logical_axis_rules(rules))
    with ctx:
        return Transformer(cfg, nnx.Rngs(params=seed))


def count_params(model_or_state) -> int:
    """Number of parameters of a module (its nnx.Params) or of a pytree of arrays."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return sum(x.size for x in jax.tree.leaves(state))


def split_model(model):
    """(graphdef, params) with params a plain nested dict of arrays: what pure steps take.
    `nnx.merge(graphdef, params)` rebuilds the module."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)
