"""Pure train and eval steps: functions of (state, batch), jitted, no hidden globals.

State is a dict {"params": nested dict of fp32 arrays, "opt_state": optax state,
"step": int32}. A batch is [grad_accum, micro_batch, T + 1] int32 tokens: inputs are
[..., :-1], targets [..., 1:].

With a mesh and rules the same step is jitted with explicit in/out shardings derived from
the params' logical names (`sharding.placement.state_shardings`), and traced under the
mesh and the rule table so the model's activation constraints apply. Parallelism is
applied here, not in the model (torchtitan's `parallelize` idea).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import lora as lora_lib
from llmjax.config import LoraConfig
from sharding.placement import (
    ShardedStep,
    batch_sharding,
    opt_state_shardings,
    param_logical_names,
    param_shardings,
    state_shardings,
)
from sharding.rules import Rules, resolve_rules


def loss_fn(params, graphdef, tokens):
    """Next-token loss of the model (graphdef, params) on tokens [B, T + 1]."""
    return nnx.merge(graphdef, params).loss(tokens)


def loss_and_metrics_fn(params, graphdef, tokens):
    """(loss, model metrics) of the model on tokens [B, T + 1] (see Transformer.loss_and_metrics)."""
    return nnx.merge(graphdef, params).loss_and_metrics(tokens)


def init_train_state(params, optimizer: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def _train_step_fn(graphdef, optimizer, schedule, grad_shardings=None, lora: LoraConfig | None = None):
    """The un-jitted step; `grad_shardings` (a params-like tree) pins the gradient
    accumulator's layout (ZeRO-2/3 keep it split like the params). With `lora` the state's
    params are the adapters and the step takes the frozen base params as a third argument."""
    if lora is None:
        grad_fn = jax.value_and_grad(loss_and_metrics_fn, has_aux=True)
    else:
        def adapted_loss(adapters, base, micro):
            return loss_and_metrics_fn(lora_lib.merge(base, adapters, lora), graphdef, micro)

        grad_fn = jax.value_and_grad(adapted_loss, has_aux=True)

    def pin(tree):
        return tree if grad_shardings is None else jax.lax.with_sharding_constraint(tree, grad_shardings)

    def train_step(state, batch, base=None):
        params = state["params"]
        frozen = graphdef if lora is None else base

        def accumulate(carry, micro):
            loss_sum, grad_sum = carry
            (loss, model_metrics), grads = grad_fn(params, frozen, micro)
            grad_sum = pin(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads))
            return (loss_sum + loss, grad_sum), model_metrics

        n = batch.shape[0]
        if n == 1:  # no accumulator: its zero-filled fp32 buffers and scan copies cost real time
            (loss_sum, model_metrics), grads = grad_fn(params, frozen, batch[0])
            model_metrics = jax.tree.map(lambda m: m[None], model_metrics)
            grads = pin(jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params))
        else:
            zeros = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
            (loss_sum, grad_sum), model_metrics = jax.lax.scan(
                accumulate, (jnp.zeros((), jnp.float32), zeros), batch)
            grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grad_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads),
                   **jax.tree.map(lambda m: m.mean(0), model_metrics)}
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, metrics

    return train_step


def _check_mesh_rules(mesh, rules):
    if (mesh is None) != (rules is None):
        raise ValueError("pass mesh and rules together (or neither, for an unsharded step); got "
                         f"mesh={'set' if mesh is not None else None}, rules={rules!r}")


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule=None, *,
                    mesh=None, rules: str | Rules | None = None, lora: LoraConfig | None = None):
    """A jitted `train_step(state, batch) -> (state, metrics)` that donates `state`.

    Gradients of the micro-batches (leading axis of `batch`) are summed in fp32 by a scan
    and divided by their count: equal to one step on the concatenated batch.
    Metrics: loss, grad_norm (before clipping), lr (when `schedule` is given), and the
    model's own metrics (`Transformer.loss_and_metrics`), averaged over micro-batches.

    Args:
      graphdef: the model's graphdef (`split_model`).
      optimizer: an optax transformation (`make_optimizer`).
      schedule: optional step -> learning rate, reported as metrics["lr"].
      mesh: a mesh from `sharding.mesh.make_mesh`; None for the plain jitted step.
      rules: with `mesh`: a preset name of `sharding.rules.PRESETS` or a rule table. The
        state is laid out by `sharding.placement.state_shardings`, the batch split on its
        micro-batch axis by the `batch` rule; metrics are replicated.
      lora: a LoraConfig with rank >= 1 trains adapters only: the step is
        `train_step(state, batch, base) -> (state, metrics)` with state["params"] the
        adapters (`llmjax.lora.init_adapters`) and `base` the frozen params (an argument,
        not donated). With a mesh, adapters take their weights' logical names
        (`lora_shardings`). rank 0 or None: the plain step.
    Returns:
      The step; with a mesh a `ShardedStep`. Uncommitted arrays (a fresh state, a host
      batch) are placed by jit; a state committed to another layout raises a ValueError
      from jit: move it with `sharding.placement.shard_state` first.
    Raises:
      ValueError: only one of mesh and rules given, unknown preset or invalid table (at
        once), or a dim the mesh does not divide (on the first call).
    """
    _check_mesh_rules(mesh, rules)
    lora = lora if lora is not None and lora.rank > 0 else None
    if mesh is None:
        return jax.jit(_train_step_fn(graphdef, optimizer, schedule, lora=lora), donate_argnums=0)
    param_rules, _ = resolve_rules(rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def make_shardings(state, batch, base=None):
        batch_sh = batch_sharding(mesh, rules, np.ndim(batch))
        if lora is None:
            state_sh = state_shardings(graphdef, state, mesh, rules)
            return (state_sh, batch_sh), (state_sh, replicated)
        state_sh, base_sh = lora_shardings(graphdef, lora, state, base, mesh, rules)
        return (state_sh, batch_sh, base_sh), (state_sh, replicated)

    def make_fn(in_shardings, *args):
        return _train_step_fn(graphdef, optimizer, schedule, grad_shardings=in_shardings[0]["params"], lora=lora)

    return ShardedStep(make_fn, make_shardings, mesh, param_rules, donate_argnums=0)


def lora_shardings(graphdef, lora: LoraConfig, state: dict, base: dict, mesh, rules: str | Rules):
    """(state shardings, base shardings) of a LoRA train state (adapters as params) and its
    frozen base: the base laid out as the model's params; A takes its weight's input
    names, B its output names (`llmjax.lora.logical_names`); Adam moments follow them
    under the optimizer-state rules; the rest replicates. Arrays or ShapeDtypeStructs."""
    param_rules, opt_rules = resolve_rules(rules)
    base_names = param_logical_names(graphdef, base)
    names = lora_lib.logical_names(base_names, lora, base)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = {key: jax.tree.map(lambda _: replicated, value) for key, value in state.items()}
    state_sh["params"] = param_shardings(state["params"], names, mesh, param_rules)
    state_sh["opt_state"] = opt_state_shardings(state["opt_state"], state["params"], names, mesh, opt_rules)
    return state_sh, param_shardings(base, base_names, mesh, param_rules)


def make_eval_step(graphdef, *, mesh=None, rules: str | Rules | None = None):
    """A jitted `eval_step(params, tokens [B, T + 1]) -> mean loss`.

    With `mesh` and `rules` (as in `make_train_step`) params keep the train layout and
    tokens are split on their batch axis.
    """
    _check_mesh_rules(mesh, rules)
    if mesh is None:
        return jax.jit(lambda params, tokens: loss_fn(params, graphdef, tokens))
    param_rules, _ = resolve_rules(rules)

    def make_shardings(params, tokens):
        params_sh = state_shardings(graphdef, {"params": params}, mesh, rules)["params"]
        return (params_sh, batch_sharding(mesh, rules, np.ndim(tokens))), NamedSharding(mesh, PartitionSpec())

    def make_fn(in_shardings, params, tokens):
        return lambda params, tokens: loss_fn(params, graphdef, tokens)

    return ShardedStep(make_fn, make_shardings, mesh, param_rules)
