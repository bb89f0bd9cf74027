"""A continuous-batching engine over a paged KV cache, with chunked prefill, prefix caching
and preemption by recompute.

Continuous (iteration-level) batching (Orca, Yu et al. OSDI 2022): the batch is re-formed
every step; a finished sequence frees its slot and its KV blocks at once and a waiting request
takes them at the next step. Chunked prefill (Sarathi, Agrawal et al. 2023): a prompt enters
`chunk_size` tokens per step beside the decoding sequences, so a long prompt never stalls
them. When the block pool runs dry the newest running sequence is preempted: its blocks are
freed and it is requeued with the tokens generated so far, to be recomputed later (vLLM's
recompute policy, Kwon et al. 2023 section 4.5). Each step is one jitted call over a fixed
batch: `max_slots` rows of one token (decoding) plus, when a prompt is being read,
`prefill_slots` rows of `chunk_size` tokens; two shapes, so two compiles.
"""
import collections
import dataclasses
import itertools
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.config import ConfigError, DecodeConfig
from llmjax.decode import paged
from llmjax.decode.generate import DECODE_COMPILER_OPTIONS, forward_hidden, split_layers

SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "seed")


class RequestError(ValueError):
    """A request the engine will not run (it keeps serving the others)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """max_slots: running sequences (decode rows per step); prefill_slots: sequences that
    prefill a chunk per step; chunk_size: prompt tokens per chunk; block_size: positions per
    KV block; num_blocks: blocks in the pool; prefix_caching: share full blocks across
    requests by chain hash; kv_dtype: "model" (the compute dtype), "bfloat16", or "int8" /
    "fp8" (codes with per position and head scales; about half the bytes of bf16)."""
    max_slots: int = 8
    prefill_slots: int = 2
    chunk_size: int = 64
    block_size: int = 16
    num_blocks: int = 256
    prefix_caching: bool = True
    kv_dtype: str = "model"

    def __post_init__(self):
        if self.kv_dtype not in paged.KV_DTYPES:
            raise ValueError(f"EngineConfig.kv_dtype={self.kv_dtype!r}; allowed: {', '.join(paged.KV_DTYPES)}")
        for name in ("max_slots", "prefill_slots", "chunk_size", "block_size", "num_blocks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r} must be an int >= 1")


@dataclasses.dataclass
class Sequence:
    """One request's state: its tokens so far (prompt, then generated), KV blocks, timings."""
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: DecodeConfig
    stop_tokens: frozenset
    arrival: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full, computed blocks
    num_computed: int = 0  # positions whose KV is in the cache
    cached_tokens: int = 0  # prompt positions found in the prefix cache (all admissions)
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Per-row sampling, logits [S, V] -> [S] int32, with per-row options [S] (as arrays, so one
    compiled step serves any mix): temperature 0 is greedy, top_k 0 and top_p 1 are off; the
    filters match `llmjax.decode.sampling.sample_logits`."""
    vocab = logits.shape[-1]
    x = logits.astype(jnp.float32)
    x = (x - jnp.max(x, axis=-1, keepdims=True)) / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # as filter_logits
    descending = -jnp.sort(-x, axis=-1)
    kth = jnp.take_along_axis(descending, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
    descending = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p[:, None], axis=-1, keepdims=True)
    x = jnp.where(x < jnp.take_along_axis(descending, keep - 1, axis=-1), -jnp.inf, x)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("pages",),
         compiler_options=DECODE_COMPILER_OPTIONS)
def _device_step(graphdef, params, layers, pages, decode, prefill, sampling):
    """One engine step over the paged cache: the decode rows (tokens/positions [S, 1]) and, if
    any, the prefill rows ([P, C]) through the model, then each row's next token sampled from
    its logits at last_index. `layers` and `pages` are per-layer weights and page pools (see
    `llmjax.decode.generate.split_layers`: the layers run unrolled, so no step copies a layer's
    weights or pool out of a stack). Rows are dicts of tokens, positions, block_tables [R, M],
    seq_lens and last_index [R]; sampling holds temperature, top_k, top_p, seeds,
    sample_index [S (+ P)]. Returns (next tokens [S (+ P)], pages)."""
    model = nnx.merge(graphdef, params)
    last = []
    for rows in (decode, prefill):
        if rows is None:
            continue
        caches = [paged.paged_cache(layer_pages, rows["block_tables"], rows["seq_lens"])
                  for layer_pages in pages]
        hidden, caches = forward_hidden(model, layers, rows["tokens"], rows["positions"], caches)
        last.append(jnp.take_along_axis(hidden, rows["last_index"][:, None, None], axis=1))  # [R, 1, D]
        pages = [{name: c[name] for name in layer} for c, layer in zip(caches, pages)]
    logits = model.logits(jnp.concatenate(last))[:, 0]  # [S (+ P), V]
    # A request's i-th token draws from fold_in(key(seed), i): independent of batching.
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
        sampling["seeds"], sampling["sample_index"])
    next_tokens = sample_rows(logits, keys, sampling["temperature"], sampling["top_k"],
                              sampling["top_p"])
    return next_tokens, pages


class Engine:
    """Serve generation requests with continuous batching over a paged KV cache.

    `submit` queues a request (any time, also between steps); `step` runs one device call and
    returns the sequences that finished; `run` steps until every request is done.
    """

    def __init__(self, model, cfg: EngineConfig = EngineConfig()):
        self.cfg = cfg
        # Serve in the compute dtype: weights are read once per step, never cast per step.
        compute = jnp.dtype(model.cfg.dtype)
        graphdef, params = nnx.split(model)
        params = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              params)
        model = nnx.merge(graphdef, params)
        self.graphdef, self.params = graphdef, params
        self.vocab_size = model.cfg.vocab_size
        self.blocks_per_seq = model.cfg.max_seq_len // cfg.block_size
        self.context = self.blocks_per_seq * cfg.block_size  # positions a sequence may reach
        if self.blocks_per_seq < 1:
            raise ValueError(f"EngineConfig.block_size={cfg.block_size} exceeds "
                             f"model.max_seq_len={model.cfg.max_seq_len}")
        if cfg.num_blocks < self.blocks_per_seq:  # else a lone full-length sequence could not run
            raise ValueError(f"EngineConfig.num_blocks={cfg.num_blocks} must be >= {self.blocks_per_seq} "
                             f"(one sequence of model.max_seq_len={model.cfg.max_seq_len})")
        self.allocator = paged.BlockAllocator(cfg.num_blocks, cfg.block_size,
                                              prefix_caching=cfg.prefix_caching)
        self.layers = split_layers(model)  # per-layer weights, sliced once
        self.pages = [paged.init_paged_cache(model.cfg, cfg.num_blocks, cfg.block_size, n_layers=1,
                                             kv_dtype=cfg.kv_dtype)
                      for _ in range(model.cfg.n_layers)]
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.finished: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.steps = 0

    def submit(self, prompt, max_new_tokens: int, sampling: dict | None = None,
               stop_tokens=(), arrival: float | None = None) -> int:
        """Queue a request; returns its id.

        Args:
          prompt: token ids (non-empty, each in [0, vocab_size)).
          max_new_tokens: >= 1; prompt length + max_new_tokens must fit the context.
          sampling: any of temperature, top_k, top_p, seed (`DecodeConfig` meanings and
            defaults; temperature 0 is greedy).
          stop_tokens: ids that end the sequence (the stop token is kept in the output).
          arrival: the request's arrival time (time.perf_counter()), default now.
        Raises:
          RequestError: the request is malformed; the engine state is unchanged.
        """
        what = "prompt and stop_tokens must be 1-D lists of integer token ids"
        try:
            ids = {"prompt": np.asarray(prompt), "stop_tokens": np.asarray(list(stop_tokens))}
        except (TypeError, ValueError) as e:  # not iterable, or ragged
            raise RequestError(f"{what}: {e}") from None
        bad = {name: f"{a.dtype}{list(a.shape)}" for name, a in ids.items()
               if a.ndim != 1 or (a.size and a.dtype.kind not in "iu")}
        if bad:  # a float id or a batch of prompts would be truncated or flattened silently
            raise RequestError(f"{what}; got {bad}")
        prompt = [int(t) for t in ids["prompt"]]
        stop_tokens = frozenset(int(t) for t in ids["stop_tokens"])
        if not prompt:
            raise RequestError("prompt is empty; give at least one token id")
        if not 0 <= min(prompt) <= max(prompt) < self.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size}); "
                               f"got min {min(prompt)}, max {max(prompt)}")
        if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer))
                or max_new_tokens <= 0):
            raise RequestError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        if len(prompt) + max_new_tokens > self.context:
            raise RequestError(f"prompt length {len(prompt)} + max_new_tokens={max_new_tokens} "
                               f"exceeds the context of {self.context} positions")
        sampling = dict(sampling or {})
        unknown = sorted(set(sampling) - set(SAMPLING_OPTIONS))
        if unknown:
            raise RequestError(f"unknown sampling option(s) {unknown}; allowed: {SAMPLING_OPTIONS}")
        try:
            options = DecodeConfig(max_new_tokens=int(max_new_tokens), **sampling)
        except ConfigError as e:
            raise RequestError(f"bad sampling option: {e}") from None
        for name in ("top_k", "seed"):  # the step carries them as int32
            if getattr(options, name) >= 2**31:
                raise RequestError(f"{name}={getattr(options, name)} must be < 2**31")
        seq = Sequence(id=next(self._ids), prompt=prompt, max_new_tokens=int(max_new_tokens),
                       sampling=options, stop_tokens=stop_tokens,
                       arrival=time.perf_counter() if arrival is None else arrival,
                       tokens=list(prompt))
        self.waiting.append(seq)
        return seq.id

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> dict[int, Sequence]:
        """Step until no request is waiting or running; returns every finished sequence by id."""
        while self.has_work():
            self.step()
        return self.finished

    def step(self) -> list[Sequence]:
        """Admit waiting requests, schedule one chunk per running sequence, run the device call,
        and retire finished sequences (returned)."""
        self._admit()
        plan = self._schedule()  # [(sequence, tokens to compute this step)]
        if not plan:
            return []
        next_tokens = self._run_device(plan)
        self.steps += 1
        done = []
        now = time.perf_counter()
        for (seq, n), token in zip(plan, next_tokens):
            seq.num_computed += n
            self._register_full_blocks(seq)
            if seq.num_computed < len(seq.tokens):
                continue  # mid-prefill: the sampled token is not needed yet
            seq.tokens.append(int(token))
            seq.first_token_time = seq.first_token_time or now
            if token in seq.stop_tokens:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                seq.finish_time = now
                self._free(seq)
                self.running.remove(seq)
                self.finished[seq.id] = seq
                done.append(seq)
        return done

    def _admit(self) -> None:
        """Move waiting requests into free slots while the pool has blocks for their first chunk."""
        bs = self.cfg.block_size
        reserved = 0  # blocks the requests admitted in this call will take for their first chunks
        while self.waiting and len(self.running) < self.cfg.max_slots:
            seq = self.waiting[0]
            # Reuse cached full blocks of the known tokens, leaving >= 1 token to compute.
            hashes = paged.block_hashes(seq.tokens[:-1], bs) if self.cfg.prefix_caching else []
            for block_hash in hashes:
                block = self.allocator.lookup(block_hash)
                if block is None:
                    break
                seq.blocks.append(block)
            seq.hashes = hashes[:len(seq.blocks)]
            seq.num_computed = len(seq.blocks) * bs
            first_chunk = min(self.cfg.chunk_size, len(seq.tokens) - seq.num_computed)
            needed = -(-(seq.num_computed + first_chunk) // bs) - len(seq.blocks)
            if self.running and needed > self.allocator.num_available() - reserved:
                self._free(seq)  # wait for blocks; give back the cached ones for now
                return
            reserved += needed
            seq.cached_tokens += seq.num_computed
            self.running.append(self.waiting.popleft())

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Give each running sequence its next chunk (1 token when decoding; up to
        prefill_slots chunks a step) and the blocks for it, oldest first; preempt the newest
        sequences while the pool is short."""
        plan, prefills = [], 0
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted for an older sequence in this loop
            n = min(self.cfg.chunk_size, len(seq.tokens) - seq.num_computed)
            if n > 1 and prefills == self.cfg.prefill_slots:
                continue  # prefill rows are taken; this prompt continues next step
            if self._grow(seq, seq.num_computed + n):
                plan.append((seq, n))
                prefills += n > 1
        return plan

    def _grow(self, seq: Sequence, length: int) -> bool:
        """Give `seq` blocks for `length` positions, preempting newer sequences (or `seq`
        itself, returning False) while the pool is exhausted."""
        while len(seq.blocks) * self.cfg.block_size < length:
            block = self.allocator.allocate()
            if block is not None:
                seq.blocks.append(block)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free all of `seq`'s blocks and requeue it first, keeping its generated tokens."""
        self._free(seq)
        self.running.remove(seq)
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):  # tail first: it is evicted before the shared prefix
            self.allocator.release(block)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks that became full this step by their prefix hash."""
        bs, done = self.cfg.block_size, len(seq.hashes)
        if not self.cfg.prefix_caching or seq.num_computed < (done + 1) * bs:
            return
        parent = seq.hashes[-1] if seq.hashes else None
        seq.hashes += paged.block_hashes(seq.tokens[done * bs:seq.num_computed], bs, parent)
        for i in range(done, len(seq.hashes)):
            self.allocator.register(seq.blocks[i], seq.hashes[i])

    def _run_device(self, plan) -> list[int]:
        """Run one step: single tokens in the [max_slots, 1] decode rows, chunks in the
        [prefill_slots, chunk_size] prefill rows (absent when no sequence prefills). Returns
        the sampled token of each plan entry."""
        decode = [entry for entry in plan if entry[1] == 1]
        prefill = [entry for entry in plan if entry[1] > 1]
        decode_rows, decode_sampling = self._pack(decode, self.cfg.max_slots, 1)
        prefill_rows, sampling = None, decode_sampling
        if prefill:
            prefill_rows, prefill_sampling = self._pack(prefill, self.cfg.prefill_slots,
                                                        self.cfg.chunk_size)
            sampling = {k: np.concatenate([v, prefill_sampling[k]]) for k, v in sampling.items()}
        next_tokens, self.pages = _device_step(self.graphdef, self.params, self.layers, self.pages,
                                               decode_rows, prefill_rows, sampling)
        next_tokens = np.asarray(next_tokens)
        row_of = {id(seq): i for i, (seq, _) in enumerate(decode)}
        row_of.update({id(seq): self.cfg.max_slots + i for i, (seq, _) in enumerate(prefill)})
        return [int(next_tokens[row_of[id(seq)]]) for seq, _ in plan]

    def _pack(self, entries, n_rows: int, width: int) -> tuple[dict, dict]:
        """Model rows and sampling options for `entries` [(sequence, tokens)], padded to n_rows
        rows of `width` tokens (padding: position -1, never written, length 0)."""
        rows = dict(tokens=np.zeros((n_rows, width), np.int32),
                    positions=np.full((n_rows, width), -1, np.int32),
                    block_tables=np.zeros((n_rows, self.blocks_per_seq), np.int32),
                    seq_lens=np.zeros(n_rows, np.int32), last_index=np.zeros(n_rows, np.int32))
        sampling = dict(temperature=np.zeros(n_rows, np.float32), top_k=np.zeros(n_rows, np.int32),
                        top_p=np.ones(n_rows, np.float32), seeds=np.zeros(n_rows, np.int32),
                        sample_index=np.zeros(n_rows, np.int32))
        for row, (seq, n) in enumerate(entries):
            start = seq.num_computed
            rows["tokens"][row, :n] = seq.tokens[start:start + n]
            rows["positions"][row, :n] = np.arange(start, start + n)
            rows["block_tables"][row, :len(seq.blocks)] = seq.blocks
            rows["seq_lens"][row], rows["last_index"][row] = start + n, n - 1
            options = seq.sampling
            for name in ("temperature", "top_k", "top_p"):
                sampling[name][row] = getattr(options, name)
            sampling["seeds"][row], sampling["sample_index"][row] = options.seed, len(seq.generated)
        return rows, sampling

    def kv_usage(self) -> dict:
        """KV slots now: `allocated` (blocks referenced x block_size), `live` (slots holding a
        computed position of a running sequence, shared blocks counted once), `tokens` (computed
        positions summed over running sequences, shared ones counted per sequence), `running`.

        Only full blocks are ever shared, so the empty slots are each sequence's own tail slack.
        """
        bs = self.cfg.block_size
        allocated = self.allocator.num_used() * bs
        slack = sum(len(seq.blocks) * bs - seq.num_computed for seq in self.running)
        return dict(allocated=allocated, live=allocated - slack,
                    tokens=sum(seq.num_computed for seq in self.running), running=len(self.running))
