"""Paged KV memory for serving: a block allocator with reference counts and a prefix cache.

PagedAttention (Kwon et al. 2023, arXiv:2309.06180): the KV cache is a pool of fixed-size
blocks (pages); each sequence owns a block table of the blocks holding its positions, so memory
grows a block at a time and is returned the moment a sequence finishes. Prefix caching
(vLLM's automatic prefix caching; SGLang's RadixAttention shares prefixes the same way): a full
block is named by a chain hash of every token up to its end, so requests that share a prompt
prefix share its blocks; blocks nobody references stay cached until the pool needs them, the
least recently used first.
"""
import collections
import hashlib

import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode_attention.reference import SCALE_DTYPE


def block_hashes(tokens, block_size: int, parent: bytes | None = None) -> list[bytes]:
    """Chain digests of the full blocks of `tokens`: digest i covers tokens[: (i + 1) * block_size],
    so equal digests mean equal whole prefixes, not just equal blocks. `parent`: the digest of the
    blocks before `tokens` (to extend a chain). SHA-256, not Python's hash(): that is unsalted for
    integers, so a prompt could be built offline to collide with another user's prefix and be
    served its KV blocks."""
    hashes = []
    for end in range(block_size, len(tokens) + 1, block_size):
        block = np.asarray(tokens[end - block_size:end], np.int64).tobytes()
        parent = hashlib.sha256((parent or b"") + block).digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Blocks 0..num_blocks-1 of the KV pool: a free list, reference counts, and (when
    `prefix_caching`) a hash -> block map whose unreferenced blocks are evicted LRU-first.

    Invariants (`check`): every block is exactly one of free, referenced (count > 0), or
    cached-and-unreferenced (in the LRU); a hashed block maps back to its hash.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = collections.deque(range(num_blocks))
        self.ref_counts = np.zeros(num_blocks, np.int64)
        self.block_of_hash: dict[bytes, int] = {}
        self.hash_of_block: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    def num_available(self) -> int:
        """Blocks `allocate` can hand out now (free, or cached but unreferenced)."""
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return int(np.count_nonzero(self.ref_counts))

    def allocate(self) -> int | None:
        """A fresh block with reference count 1, or None when the pool is exhausted."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.block_of_hash[self.hash_of_block.pop(block)]
        else:
            return None
        self.ref_counts[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop one reference; an unreferenced block becomes free, or evictable if cached."""
        if self.ref_counts[block] <= 0:
            raise ValueError(f"block {block} released with reference count {self.ref_counts[block]}")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.hash_of_block:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def lookup(self, block_hash: bytes) -> int | None:
        """The cached block holding this prefix hash with one more reference, or None."""
        block = self.block_of_hash.get(block_hash) if self.prefix_caching else None
        if block is not None:
            self.evictable.pop(block, None)
            self.ref_counts[block] += 1
        return block

    def register(self, block: int, block_hash: bytes) -> None:
        """Name a full, written block by its prefix hash (first writer wins on duplicates)."""
        if self.prefix_caching and block_hash not in self.block_of_hash and block not in self.hash_of_block:
            self.block_of_hash[block_hash] = block
            self.hash_of_block[block] = block_hash

    def check(self) -> None:
        """Assert the invariants (tests call this after every engine step)."""
        free, lru = set(self.free), set(self.evictable)
        referenced = set(np.flatnonzero(self.ref_counts > 0).tolist())
        assert len(free) == len(self.free), "a block is on the free list twice"
        assert not (free & lru) and not (free & referenced) and not (lru & referenced), \
            "a block is in two states"
        assert free | lru | referenced == set(range(self.num_blocks)), "a block was lost"
        assert lru <= set(self.hash_of_block), "an evictable block has no hash"
        assert all(self.block_of_hash[h] == b for b, h in self.hash_of_block.items()), \
            "hash maps disagree"
        assert (self.ref_counts >= 0).all(), "negative reference count"


KV_DTYPES = ("model", "bfloat16", "int8", "fp8")
QUANTIZED_KV = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}  # codes with per-(position, head) scales


def init_paged_cache(cfg, num_blocks: int, block_size: int, dtype=None, n_layers=None,
                     kv_dtype: str = "model") -> dict:
    """Zeroed page pools {"k_pages", "v_pages"}: [L, P, bs, K, H] (no tables yet); L is
    n_layers, default all of the model's (1: one layer's pool, for layer-by-layer decoding).
    kv_dtype "int8" / "fp8" (e4m3): pools of codes plus "k_scales", "v_scales" [L, P, bs, K]
    bf16 (see llmjax.models.kv_cache); "bfloat16": bf16 pools; "model": pools in `dtype`
    (default the model's compute dtype)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r}; allowed: {', '.join(KV_DTYPES)}")
    shape = (n_layers or cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
    if kv_dtype in QUANTIZED_KV:
        codes = QUANTIZED_KV[kv_dtype]
        return {"k_pages": jnp.zeros(shape, codes), "v_pages": jnp.zeros(shape, codes),
                "k_scales": jnp.zeros(shape[:-1], SCALE_DTYPE), "v_scales": jnp.zeros(shape[:-1], SCALE_DTYPE)}
    dtype = jnp.dtype("bfloat16" if kv_dtype == "bfloat16" else dtype or cfg.dtype)
    return {"k_pages": jnp.zeros(shape, dtype), "v_pages": jnp.zeros(shape, dtype)}


def kv_bytes_per_token(pages: dict) -> float:
    """Bytes one position takes in the pools (pages and scales, all layers)."""
    slots = pages["k_pages"].shape[1] * pages["k_pages"].shape[2]
    return sum(x.size * x.dtype.itemsize for x in pages.values()) / slots


def paged_cache(pages: dict, block_tables, seq_lens) -> dict:
    """The model's paged cache (see llmjax.models.kv_cache): the pools (and scales, if int8)
    plus block tables [B, M] and sequence lengths [B], repeated over the layer axis."""
    n_layers = pages["k_pages"].shape[0]
    tables = jnp.asarray(block_tables, jnp.int32)
    lens = jnp.asarray(seq_lens, jnp.int32)
    return dict(pages, block_tables=jnp.broadcast_to(tables, (n_layers, *tables.shape)),
                seq_lens=jnp.broadcast_to(lens, (n_layers, *lens.shape)))
