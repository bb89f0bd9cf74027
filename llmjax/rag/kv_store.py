"""Stored document KV (CacheGen, Liu et al., SIGCOMM 2024): what int8 KV costs in quality and
bytes, and how fast stored KV loads compared with recomputing the prefill."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.decode import paged
from pallas_kernels._bench import wall_seconds


def _paged_for_windows(cfg, batch: int, length: int, block_size: int, kv_dtype: str) -> dict:
    """A paged cache holding `batch` sequences of `length` positions in private pages."""
    per_seq = -(-length // block_size)
    pages = paged.init_paged_cache(cfg, batch * per_seq, block_size, kv_dtype=kv_dtype)
    tables = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    return paged.paged_cache(pages, tables, np.full(batch, length, np.int32))


def kv_perplexity(model, windows, *, kv_dtype: str = "model", block_size: int = 16,
                  batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over token windows [n, T + 1] when every attention
    reads its keys and values back from a paged cache of `kv_dtype` (int8: each query sees the
    quantized KV of its whole prefix, itself included, as a decode from stored KV would).

    Raises:
      ValueError: no windows, T not a multiple of block_size, or T > model.max_seq_len.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) == 0:
        raise ValueError(f"windows must be a non-empty [n, seq_len + 1] array, got shape {windows.shape}")
    length = windows.shape[1] - 1
    if length % block_size or length > model.cfg.max_seq_len:
        raise ValueError(f"window length {length} must be a multiple of block_size={block_size} and "
                         f"<= model.max_seq_len={model.cfg.max_seq_len}")
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_sum(state, batch):
        m = nnx.merge(graphdef, state)
        cache = _paged_for_windows(m.cfg, batch.shape[0], length, block_size, kv_dtype)
        hidden, _ = m.hidden_states(batch[:, :-1], cache=cache)
        logp = jax.nn.log_softmax(m.logits(hidden), axis=-1)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).sum()

    total = sum(float(loss_sum(state, jnp.asarray(windows[i:i + batch_size])))
                for i in range(0, len(windows), batch_size))
    return float(np.exp(total / (len(windows) * length)))


def load_vs_prefill(model, tokens, *, block_size: int = 16, reps: int = 5) -> dict:
    """Seconds to bring a document's stored int8 KV (pages + scales, host memory) onto the
    device against seconds to recompute it by a prefill of `tokens` [T] (compiled, median of
    `reps`), and the bytes moved."""
    length = len(tokens)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, batch):
        m = nnx.merge(graphdef, state)
        cache = _paged_for_windows(m.cfg, 1, length, block_size, "int8")
        _, cache = m.hidden_states(batch, cache=cache)
        return {k: cache[k] for k in ("k_pages", "v_pages", "k_scales", "v_scales")}

    batch = jnp.asarray(np.asarray(tokens, np.int32)[None])
    stored = jax.tree.map(np.asarray, prefill(state, batch))  # the document's KV, kept on the host

    return dict(tokens=length, kv_bytes=sum(x.nbytes for x in stored.values()),
                load_s=wall_seconds(lambda: jax.device_put(stored), reps),
                prefill_s=wall_seconds(lambda: prefill(state, batch), reps))


def engine_decode_rate(model, kv_dtype: str, *, slots: int = 8, prompt_len: int = 16,
                       new_tokens: int = 32, reps: int = 3) -> dict:
    """Decode tokens/s of the engine with `slots` greedy requests decoding together, the KV
    pools in `kv_dtype`, and the pools' bytes per position (all layers, scales included).

    Wall-clock minimums of `reps` runs (each after a warm-up run that compiles its step shapes)
    of every request generating N = new_tokens and 1 token: tokens/s = slots (N - 1) / (t_N -
    t_1), so the prefill drops out. Prompts are random, prefix caching is off.
    """
    from llmjax.decode.engine import Engine, EngineConfig

    block = 16
    per_seq = -(-(prompt_len + new_tokens) // block)
    engine = Engine(model, EngineConfig(max_slots=slots, prefill_slots=min(slots, 8),
                                        chunk_size=min(prompt_len, 256), block_size=block,
                                        num_blocks=max(slots * per_seq, model.cfg.max_seq_len // block),
                                        prefix_caching=False, kv_dtype=kv_dtype))
    rng = np.random.default_rng(0)

    def serve(n):
        for prompt in rng.integers(0, model.cfg.vocab_size, (slots, prompt_len)):
            engine.submit(prompt, n)
        engine.run()

    # Minimums, not medians: the rate is a difference of two times, and on a busy host a median
    # of the short run can exceed that of the long one (a negative rate, seen on 2 CPU cores).
    one, many = (wall_seconds(lambda n=n: serve(n), reps, statistic=min) for n in (1, new_tokens))
    return dict(tokens_per_s=slots * (new_tokens - 1) / (many - one), slots=slots, prompt_len=prompt_len,
                new_tokens=new_tokens, kv_bytes_per_token=sum(paged.kv_bytes_per_token(p) for p in engine.pages))
