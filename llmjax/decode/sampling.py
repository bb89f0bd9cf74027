"""Sampling one token per row from logits: greedy, temperature, top-k, top-p (nucleus)."""
import jax
import jax.numpy as jnp


def filter_logits(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                  vocab_size: int | None = None):
    """The logits of the distribution sampling draws from: fp32 [..., V], tempered, with the
    tokens that top_k / top_p / vocab_size exclude set to -inf.

    top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p (Holtzman et al. 2019); vocab_size (the tokenizer's) drops ids at
    or past it, for padded embedding tables. temperature must be > 0 (0 means greedy: argmax).
    """
    logits = logits.astype(jnp.float32)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    # Shifted to a row maximum of 0 before tempering (the distribution is the same): a tiny
    # temperature then sends the other logits to -inf instead of every positive one to +inf.
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass before it is < top_p (the most likely one always stays).
        keep = jnp.sum(jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def greedy(logits, vocab_size: int | None = None):
    """argmax over the last axis (ids >= vocab_size excluded) -> int32."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  vocab_size: int | None = None):
    """Draw token ids from logits [B, V] -> [B] int32.

    temperature 0 is greedy (argmax); otherwise a draw from `filter_logits`'s distribution.
    Options are Python numbers, fixed at trace time.
    """
    if temperature == 0.0:
        return greedy(logits, vocab_size)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_size=vocab_size)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
