"""Sampling one token per row from logits: greedy, temperature, top-k, top-p (nucleus)."""
import jax
import jax.numpy as jnp


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Draw token ids from logits [B, V] -> [B] int32.

    temperature 0 is greedy (argmax); top_k > 0 keeps the k most likely tokens; top_p < 1
    keeps the smallest set of tokens whose probability reaches top_p (Holtzman et al. 2019).
    Options are Python numbers, fixed at trace time.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token if the mass before it is < top_p (the most likely one always stays).
        cutoff_index = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
