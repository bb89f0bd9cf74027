"""Autoregressive generation with a KV cache, all new tokens in one device call.

The prompt is prefilled in one forward pass; the remaining tokens come from a
`lax.fori_loop` of single-token steps, so there is no Python round-trip per token.
Decoding reads every weight once per step, so the weights are cast to the compute dtype
once (`prepare_decode`), not inside the loop, where each step would read fp32 and convert.
"""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import DecodeConfig, ModelConfig
from llmjax.decode import fused as fused_step
from llmjax.decode import persistent as persistent_step
from llmjax.decode.quantize import quantize_params
from llmjax.decode.sampling import sample_logits
from llmjax.models.kv_cache import init_cache


@dataclasses.dataclass(frozen=True)
class DecodeModel:
    """A model ready to decode: `nnx.merge(graphdef, params)` rebuilds it inside jit.

    params hold floating weights in the compute dtype (model.dtype), or int8 weights
    (llmjax.ops.Int8Weight, scaled after each matmul).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    cfg: ModelConfig

    @property
    def weight_bytes(self) -> int:
        """Bytes the parameters occupy on the device."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))


def graphdef_for(model_type, cfg) -> nnx.GraphDef:
    """The graph definition of `model_type(cfg, ...)`, built abstractly (no weights allocated),
    to merge existing weights into a model with changed config fields."""
    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: model_type(cfg, nnx.Rngs(params=0))))[0]


def prepare_decode(model, *, int8: bool = False, dtype: str | None = None) -> DecodeModel:
    """Split a Transformer for decoding, casting floating weights to the compute dtype once.

    Args:
      model: a Transformer (a DecodeModel passes through unchanged).
      int8: weight-only int8 quantization of the matmul weights (see quantize.py).
      dtype: compute dtype to decode in (default model.cfg.dtype), e.g. "bfloat16" for a
        model trained in float32.
    """
    if isinstance(model, DecodeModel):
        return model
    graphdef, params = nnx.split(model)
    cfg = model.cfg
    if dtype is not None and dtype != cfg.dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        graphdef = graphdef_for(type(model), cfg)
    compute = jnp.dtype(cfg.dtype)
    if int8:
        params = quantize_params(params, compute, cfg.tie_embeddings)
    params = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return DecodeModel(graphdef, params, cfg)


def split_layers(model) -> list:
    """The stacked block state as one state per layer (leading axis 1), sliced once before the
    token loop. Inside the loop each matmul then reads a whole weight buffer; a scan over the
    stacked layers would copy every layer's weight slice out of the stack at every step."""
    _, blocks = nnx.split(model.blocks)
    return [jax.tree.map(lambda x: x[i:i + 1], blocks) for i in range(model.cfg.n_layers)]


def init_layer_caches(cfg, batch: int, length: int) -> list:
    """Empty KV caches, one {"k", "v"}: [1, B, S, K, H] per layer (see split_layers)."""
    full = init_cache(cfg, batch, length)
    return [jax.tree.map(lambda c: c[i:i + 1], full) for i in range(cfg.n_layers)]


def forward_hidden(model, layers, tokens, positions, caches):
    """Final-norm hidden states [B, T, D] and updated caches, the layers unrolled in Python:
    the model's embed_tokens, apply_blocks (one layer at a time) and final_norm."""
    x = model.embed_tokens(tokens, positions)
    updated = []
    for state, cache in zip(layers, caches):
        x, cache, _ = model.apply_blocks(x, positions, cache, block_state=state)
        updated.append(cache)
    return model.final_norm(x), updated


# A decode step is ~300 kernels of a few microseconds each. XLA records them into command
# buffers (CUDA graphs); adding WHILE and CONDITIONAL lets one graph hold the token loop's body
# as well. H200, Llama 1.1B batch 1: 1.305 -> 1.171 ms/token (benchmarks/NOTES.md). GPU-only
# options, ignored by other backends.
DECODE_COMPILER_OPTIONS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
    "xla_gpu_graph_min_graph_size": 1,
}


def doubles_single_row(prompt) -> bool:
    """Whether a decode of `prompt` [B, T0] runs its one row as two identical rows: B = 1 on a
    GPU. There a one-row step pads its activation to two rows before each small projection
    (`ops.dense`: XLA would turn the vector-matrix products into slow reductions) and those pads
    are kernels of their own; two rows after the (single-row) prefill need none. H200, Llama 1.1B: 1.19 -> 1.04 ms a token
    (benchmarks/NOTES.md). The price: the second row's KV cache (twice a batch-1 cache's memory;
    its reads were ~1% of the bytes a token at a 256-token context)."""
    return prompt.shape[0] == 1 and jax.default_backend() == "gpu"


def doubled(caches):
    """Layer caches of one row (init_layer_caches: [1, B = 1, S, K, H] leaves), repeated to two
    identical rows."""
    return jax.tree.map(lambda c: jnp.concatenate([c, c], axis=1), caches)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "vocab_size",
                                   "double", "step_kind"),
         compiler_options=DECODE_COMPILER_OPTIONS)
def _generate(graphdef, params, prompt, key, steps, *, max_new_tokens, temperature, top_k, top_p, vocab_size,
              double, step_kind):
    """`double`: prompt is one row; it is prefilled once, then decoded as two identical rows (see
    doubles_single_row). `step_kind`: the token loop runs "fused" (`fused.step_logits`),
    "persistent" (`persistent.step_logits`) or "xla" (the model's layers); the prefill runs the
    model's layers."""
    model = nnx.merge(graphdef, params)
    layers = split_layers(model)
    b, t0 = prompt.shape
    total = t0 + max_new_tokens
    sample_rows = partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)

    positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (b, t0))
    hidden, caches = forward_hidden(model, layers, prompt, positions, init_layer_caches(model.cfg, b, total))
    keys = jax.random.split(key, max_new_tokens)
    tokens = jnp.zeros((b, total), jnp.int32).at[:, :t0].set(prompt)
    tokens = tokens.at[:, t0].set(sample_rows(model.logits(hidden[:, -1:])[:, 0], keys[0]))
    if double:
        tokens, caches, b = jnp.concatenate([tokens, tokens]), doubled(caches), 2
    # Once, before the loop: the kernels' weight layouts, and the persistent step's one cache.
    weights = (fused_step.layer_weights(model, layers) if step_kind == "fused" else
               persistent_step.step_weights(model, layers) if step_kind == "persistent" else None)
    if step_kind == "persistent":
        caches = persistent_step.stack_caches(caches)

    def sample(logits, key):  # the doubled row samples once, so both rows stay the same
        return jnp.concatenate([sample_rows(logits[:1], key)] * 2) if double else sample_rows(logits, key)

    def step(i, carry):  # token at position t0 + i is known; predict t0 + i + 1
        tokens, caches = carry
        pos = t0 + i
        current = jax.lax.dynamic_slice_in_dim(tokens, pos, 1, axis=1)  # [B, 1]
        positions = jnp.full((b, 1), pos, jnp.int32)
        if step_kind == "fused":
            logits, caches = fused_step.step_logits(model, weights, current, positions, caches)
        elif step_kind == "persistent":
            logits, caches = persistent_step.step_logits(model, weights, current, positions, caches)
        else:
            hidden, caches = forward_hidden(model, layers, current, positions, caches)
            logits = model.logits(hidden)[:, -1]
        nxt = sample(logits, keys[i + 1])
        return jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], pos + 1, axis=1), caches

    tokens, _ = jax.lax.fori_loop(0, steps - 1, step, (tokens, caches))
    return tokens[:1] if double else tokens


def check_prompt(prompt, new_tokens: int, max_seq_len: int, what: str = "decode.max_new_tokens"):
    """The prompt as a [B, T0] int32 array, checked to fit the context with `new_tokens` more.

    Raises:
      ValueError: not [batch, length >= 1], or T0 + new_tokens > max_seq_len.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length>=1] token ids, got shape {prompt.shape}")
    total = prompt.shape[1] + new_tokens
    if total > max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + {what}={new_tokens} "
                         f"= {total} exceeds model.max_seq_len={max_seq_len}")
    return prompt


def _generate_args(model, prompt, cfg, key, vocab_size, steps=None):
    prompt = check_prompt(prompt, cfg.max_new_tokens, model.cfg.max_seq_len)
    key = jax.random.key(cfg.seed) if key is None else key
    steps = cfg.max_new_tokens if steps is None else steps
    if not isinstance(steps, int) or not 1 <= steps <= cfg.max_new_tokens:
        raise ValueError(f"steps={steps!r} must be an int in [1, decode.max_new_tokens={cfg.max_new_tokens}]")
    rows = prompt.shape[0]
    if (cfg.persistent_step and persistent_step.applies(model.cfg, rows)
            and persistent_step.weights_supported(model.params)):
        step_kind = "persistent"
    elif cfg.fused_matvec and fused_step.applies(model.cfg, rows) and fused_step.weights_supported(model.params):
        step_kind = "fused"
    else:
        step_kind = "xla"
    return (model.graphdef, model.params, prompt, key, jnp.int32(steps)), dict(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        vocab_size=vocab_size, double=doubles_single_row(prompt) and step_kind == "xla", step_kind=step_kind)


def lower_generate(model, prompt, cfg: DecodeConfig, vocab_size: int | None = None):
    """The `jax.stages.Lowered` program `generate` runs (e.g. `.compile().as_text()` to check
    the loop body for weight casts or cache copies, `.compile().memory_analysis()`)."""
    args, options = _generate_args(prepare_decode(model), prompt, cfg, None, vocab_size)
    return _generate.lower(*args, **options)


def generate_program(model, prompt, cfg: DecodeConfig, vocab_size: int | None = None):
    """`generate`'s compiled program and, for n new tokens, its arguments (generate's, less the
    static ones): a profiler times the program itself, since wrapping generate in the
    profiler's own jit would drop the decode loop's compiler options (JAX refuses them on a
    nested jit)."""
    model = prepare_decode(model)
    program = lower_generate(model, prompt, cfg, vocab_size).compile()
    return program, lambda n: _generate_args(model, prompt, cfg, None, vocab_size, steps=n)[0][1:]


def generate(model, prompt, cfg: DecodeConfig, key=None, vocab_size: int | None = None,
             steps: int | None = None):
    """Continue `prompt` [B, T0] int32 by cfg.max_new_tokens tokens; returns [B, T0 + new].

    `model`: a Transformer or a `prepare_decode` result (prepare once to decode many times
    without recasting the weights). `vocab_size` (the tokenizer's) restricts sampling to ids
    below it when the model's embedding table is larger (padded vocabularies). `steps`: make
    only the first `steps` new tokens (the rest of the buffer stays 0) in the program compiled
    for cfg.max_new_tokens, so a benchmark times several lengths with one compile.

    Raises:
      ValueError: empty prompt, T0 + max_new_tokens > model.max_seq_len, or steps out of range.
    """
    args, options = _generate_args(prepare_decode(model), prompt, cfg, key, vocab_size, steps)
    return _generate(*args, **options)
