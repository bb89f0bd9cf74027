"""One jitted optimizer step for any post-training objective.

Every stage (SFT, DPO, reward model, GRPO, QLoRA) is a loss `loss_fn(params, batch) ->
(loss, metrics)`; what differs is which tree is trained. `to_params(trainable, frozen)`
builds the model's params from the trained tree and a frozen one (LoRA adapters plus the
base, QLoRA adapters plus the 4-bit base); without it the trained tree is the params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def init_state(trainable, optimizer: optax.GradientTransformation) -> dict:
    """{"params": trainable, "opt_state", "step"}: the trained tree and its optimizer state."""
    return {"params": trainable, "opt_state": optimizer.init(trainable), "step": jnp.zeros((), jnp.int32)}


def make_step(loss_fn, optimizer: optax.GradientTransformation, to_params=None):
    """A jitted `step(state, batch, frozen=None) -> (state, metrics)` that donates `state`.

    Metrics: the loss function's own, plus `loss` and `grad_norm` (before clipping).
    """

    def step(state, batch, frozen=None):
        def objective(trainable):
            params = trainable if to_params is None else to_params(trainable, frozen)
            return loss_fn(params, batch)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                     "step": state["step"] + 1}
        return new_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=0)
