"""Paged KV memory: allocator invariants, prefix hashes, and the model over a paged cache
against the contiguous cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.config import load_config
from llmjax.decode import paged
from llmjax.models import init_model, kv_cache
from pallas_kernels.decode_attention import reference as decode_reference


def test_allocator_random_walk_keeps_invariants():
    """Random allocate / release / register / lookup: no block is lost or double-owned."""
    rng = np.random.default_rng(0)
    alloc = paged.BlockAllocator(12, 4)
    owned = []  # one entry per reference we hold
    for step in range(400):
        op = rng.integers(4)
        if op == 0:
            block = alloc.allocate()
            if block is None:
                assert alloc.num_available() == 0
            else:
                owned.append(block)
        elif op == 1 and owned:
            alloc.release(owned.pop(rng.integers(len(owned))))
        elif op == 2 and owned:
            alloc.register(owned[rng.integers(len(owned))], int(rng.integers(6)))
        elif op == 3:
            block = alloc.lookup(int(rng.integers(6)))
            if block is not None:
                owned.append(block)
        alloc.check()
        counts = np.bincount(owned, minlength=12) if owned else np.zeros(12, int)
        np.testing.assert_array_equal(alloc.ref_counts, counts)
        assert alloc.num_available() + alloc.num_used() == 12


def test_allocator_frees_at_zero_and_evicts_least_recently_used():
    alloc = paged.BlockAllocator(3, 4)
    a, b, c = alloc.allocate(), alloc.allocate(), alloc.allocate()
    assert alloc.allocate() is None, "the pool holds 3 blocks"
    alloc.register(a, 111)
    alloc.register(b, 222)
    assert alloc.lookup(222) == b and alloc.ref_counts[b] == 2  # shared: two references
    alloc.release(b)
    assert alloc.ref_counts[b] == 1 and alloc.num_available() == 0
    alloc.release(a)  # cached, unreferenced: evictable, first in LRU order
    alloc.release(b)
    alloc.release(c)  # never hashed: straight to the free list
    assert list(alloc.free) == [c] and list(alloc.evictable) == [a, b]
    assert alloc.lookup(111) == a  # a hit takes a out of the LRU
    assert alloc.allocate() == c and alloc.allocate() == b  # then b, the only evictable, goes
    assert alloc.lookup(222) is None and alloc.lookup(111) == a
    alloc.check()
    with pytest.raises(ValueError, match="released with reference count 0"):
        alloc.release(c) or alloc.release(c)


def test_prefix_caching_off_never_shares():
    alloc = paged.BlockAllocator(2, 4, prefix_caching=False)
    block = alloc.allocate()
    alloc.register(block, 7)
    alloc.release(block)
    assert alloc.lookup(7) is None and len(alloc.free) == 2


def test_block_hashes_chain_over_the_whole_prefix():
    tokens = list(range(10))
    hashes = paged.block_hashes(tokens, 4)
    assert len(hashes) == 2  # the partial third block is not hashed
    assert paged.block_hashes(tokens[4:8], 4, parent=hashes[0]) == hashes[1:]
    # The same block after a different prefix is a different block of KV.
    assert paged.block_hashes([9, 9, 9, 9] + tokens[4:8], 4)[1] != hashes[1]
    assert paged.block_hashes(tokens[:8], 4) == hashes
    assert all(isinstance(h, bytes) and len(h) == 32 for h in hashes)  # SHA-256: no crafted collisions


@jax.default_matmul_precision("highest")  # IEEE fp32 on a GPU too (XLA's dots would use TF32)
def test_model_over_paged_cache_matches_contiguous():
    """Llama-tiny (GQA, RoPE): chunked prefill (padded chunks) then single-token steps at
    different positions per row, through scattered pages, give the logits of the contiguous
    cache run one sequence at a time. On a GPU the single-token steps run the Pallas kernel."""
    model = init_model(load_config(overrides=["preset=llama-tiny"]).model, seed=2)
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t, p, c: nnx.merge(graphdef, state)(t, p, c))
    tokens = jax.random.randint(jax.random.key(0), (2, 18), 0, cfg.vocab_size, dtype=jnp.int32)
    lengths = (18, 13)  # row 1's prefill (11 tokens) ends mid-page
    expected = [forward(state, tokens[b:b + 1, :n], None, kv_cache.init_cache(cfg, 1, 32))[0][0]
                for b, n in enumerate(lengths)]
    block_size, num_blocks = 4, 12
    tables = np.random.default_rng(1).permutation(num_blocks)[:10].reshape(2, 5)
    tables = np.pad(tables, ((0, 0), (0, cfg.max_seq_len // block_size - 5)))
    pages = paged.init_paged_cache(cfg, num_blocks, block_size)
    assert kv_cache.cache_length(paged.paged_cache(pages, tables, [0, 0])) == cfg.max_seq_len
    # Each call: per row, the positions it feeds (-1 pads a row's unused columns).
    calls = [[range(8), range(8)], [range(8, 16), range(8, 11)],
             [range(16, 17), range(11, 12)], [range(17, 18), range(12, 13)]]
    got = [[], []]
    for rows in calls:
        width = max(len(r) for r in rows)
        pos = np.full((2, width), -1, np.int32)
        feed = np.zeros((2, width), np.int32)
        for b, r in enumerate(rows):
            pos[b, :len(r)] = list(r)
            feed[b, :len(r)] = np.asarray(tokens[b, r.start:r.stop])
        seq_lens = np.asarray([r.stop for r in rows], np.int32)
        logits, cache = forward(state, jnp.asarray(feed), jnp.asarray(pos),
                                paged.paged_cache(pages, tables, seq_lens))
        pages = {"k_pages": cache["k_pages"], "v_pages": cache["v_pages"]}
        for b, r in enumerate(rows):
            got[b] += list(logits[b, :len(r)])
    assert [len(g) for g in got] == list(lengths)
    for b in range(2):
        np.testing.assert_allclose(np.stack(got[b]), expected[b], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("length, position", [(64, 37), (48, 0), (128, 127)])
def test_decode_over_pages_matches_contiguous_attention(backend, length, position):
    """One decode token over a contiguous cache read as pages (what a GPU runs) equals the jnp
    reference over the slots up to the position: GQA, page sizes 64 and 16, first and last slot.
    Slots past the position hold garbage that must not be read."""
    keys = jax.random.split(jax.random.key(length + position), 5)
    batch, heads, kv_heads, head_dim = 2, 4, 2, 16
    q = jax.random.normal(keys[0], (batch, 1, heads, head_dim))
    k, v = (jax.random.normal(keys[i], (batch, 1, kv_heads, head_dim)) for i in (1, 2))
    cache = {name: 100 * jax.random.normal(keys[i], (batch, length, kv_heads, head_dim))
             for name, i in (("k", 3), ("v", 4))}
    positions = jnp.full((batch, 1), position, jnp.int32)
    _, written = kv_cache.attend_cached(q, k, v, positions, cache)  # the cache with k, v written
    want = decode_reference.contiguous_decode_attention(q[:, 0], written["k"], written["v"], positions[:, 0] + 1)
    got = kv_cache.decode_over_pages(q, written["k"], written["v"], positions, backend=backend,
                                     interpret=backend == "triton")
    np.testing.assert_allclose(got, want[:, None], rtol=1e-5, atol=1e-5)


def test_decode_page_size_needs_a_kernel_tile():
    assert kv_cache.decode_page_size((1, 384, 4, 64)) == 64
    assert kv_cache.decode_page_size((1, 48, 4, 64)) == 16
    assert kv_cache.decode_page_size((1, 40, 4, 64)) is None  # 40 slots: no page size of 16+
    assert kv_cache.decode_page_size((1, 64, 4, 96)) is None  # head dim 96: no Triton tile
    q, cache = jnp.zeros((1, 1, 4, 64)), jnp.zeros((1, 40, 4, 64))
    with pytest.raises(ValueError, match=r"cache shape=\(1, 40, 4, 64\)"):
        kv_cache.decode_over_pages(q, cache, cache, jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"q.shape=\(1, 2, 4, 64\)"):
        kv_cache.decode_over_pages(jnp.zeros((1, 2, 4, 64)), cache[:, :32], cache[:, :32],
                                   jnp.zeros((1, 2), jnp.int32))
