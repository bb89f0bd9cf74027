"""A decode step under test beside the model's own layers, token by token from one prefill."""
import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.decode.generate import forward_hidden, init_layer_caches, split_layers


def steps_both_ways(dm, prompt, tokens, kernel=None):
    """Prefill `prompt` with the model's layers, then feed `tokens` [B, steps] one a step from
    that cache through the model's layers and, if given, a kernel step: kernel = (prepare, step)
    with prepare(model, layers, caches) -> (weights, its cache) and step(model, weights, token,
    positions, cache) -> (logits, cache). Returns (kernel logits, model logits, kernel cache,
    model caches), lists of steps for the logits."""
    net = nnx.merge(dm.graphdef, dm.params)
    layers = split_layers(net)
    b, t0 = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (b, t0))
    _, caches = forward_hidden(net, layers, prompt, positions, init_layer_caches(net.cfg, b, t0 + tokens.shape[1]))
    if kernel is not None:
        prepare, step = kernel
        weights, cache_ours = prepare(net, layers, caches)
        kernel_step = jax.jit(lambda params, *args: step(nnx.merge(dm.graphdef, params), *args))

    @jax.jit
    def model_step(params, layers, token, pos, caches):
        net = nnx.merge(dm.graphdef, params)
        hidden, caches = forward_hidden(net, layers, token, pos, caches)
        return net.logits(hidden)[:, -1], caches

    ours, theirs = [], []
    for i in range(tokens.shape[1]):
        pos, token = jnp.full((b, 1), t0 + i, jnp.int32), tokens[:, i:i + 1]
        if kernel is not None:
            logits, cache_ours = kernel_step(dm.params, weights, token, pos, cache_ours)
            ours.append(logits)
        logits, caches = model_step(dm.params, layers, token, pos, caches)
        theirs.append(logits)
    return ours, theirs, cache_ours if kernel is not None else None, caches
