"""Pure train and eval steps: functions of (state, batch), jitted, no hidden globals.

State is a dict {"params": nested dict of fp32 arrays, "opt_state": optax state,
"step": int32}. A batch is [grad_accum, micro_batch, T + 1] int32 tokens: inputs are
[..., :-1], targets [..., 1:].
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx


def loss_fn(params, graphdef, tokens):
    """Next-token loss of the model (graphdef, params) on tokens [B, T + 1]."""
    return nnx.merge(graphdef, params).loss(tokens)


def init_train_state(params, optimizer: optax.GradientTransformation) -> dict:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule=None):
    """A jitted `train_step(state, batch) -> (state, metrics)` that donates `state`.

    Gradients of the micro-batches (leading axis of `batch`) are summed in fp32 by a scan
    and divided by their count: equal to one step on the concatenated batch.
    Metrics: loss, grad_norm (before clipping), lr (when `schedule` is given).
    """
    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state, batch):
        params = state["params"]

        def accumulate(carry, micro):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, graphdef, micro)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), batch)
        n = batch.shape[0]
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grad_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        metrics = {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef):
    """A jitted `eval_step(params, tokens [B, T + 1]) -> mean loss`."""
    return jax.jit(lambda params, tokens: loss_fn(params, graphdef, tokens))
