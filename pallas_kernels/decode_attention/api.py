"""paged_decode_attention: input checks, backend choice, padding around the Pallas kernel.

B batch, N query heads, K kv heads, G = N // K, H head dim, P pool pages, bs page size,
M pages per sequence.
"""
import logging

import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _api
from pallas_kernels._triton import MIN_DOT_ROWS
from pallas_kernels.decode_attention import config, reference, triton_decode

BACKENDS = ("auto", "reference", "triton")
CODE_DTYPES = (jnp.int8, jnp.float8_e4m3fn)  # quantized pages, read with per-position scales

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, scale=None,
                           k_scales=None, v_scales=None, backend="auto", interpret=False, blocks=None,
                           split_counts=None):
    """Attention of one new query token per sequence over its keys held in pages.

    Args:
      q: [B, N, H] (the current token's queries), float32/bfloat16/float16.
      k_pages, v_pages: [P, bs, K, H], q's dtype; K divides N (query head n reads kv head
        n // (N // K)). A page holds bs consecutive positions of one sequence.
      block_tables: [B, M] int: sequence b's position p lives in page block_tables[b, p // bs]
        at slot p % bs. Entries past a sequence's length are ignored (any value).
      lengths: [B] int, keys per sequence (0 <= length <= M * bs); a length-0 row gives zeros.
      scale: logit scale (Python number), default H ** -0.5.
      k_scales, v_scales: None, or [P, bs, K] bfloat16 for int8 or float8_e4m3fn pages: a stored
        value is page * scale (one scale per position and kv head, `reference.quantize_pages`);
        the kernel casts the scales to fp32 and dequantizes as it reads.
      backend: "auto" (the Triton kernel on a GPU or with interpret=True, else the reference;
        head dims or page sizes without a kernel fall back, logged once), "reference" (plain
        jnp, fp32), "triton" (raises where it cannot run).
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      blocks: `config.DecodeBlocks`; default `config.default_blocks`.
      split_counts: None, or [B, K] int32 zeros: the last split program of each (sequence, kv
        head) to finish, counted here, merges the splits inside the kernel (one launch a call
        instead of three) and sets its count back to zero. Where the kernel does not merge
        (`triton_decode.merges_in_kernel`: one split, or partials too large for its registers;
        the reference backend) the counts pass through untouched.
    Returns:
      [B, N, H] in q's dtype. With split_counts: (that, the counts), the counts for the next call.
    Raises:
      ValueError: bad rank, dtype, shapes, backend or blocks; the message names the value.
    """
    _validate(q, k_pages, v_pages, block_tables, lengths, backend=backend, blocks=blocks)
    _validate_scales(k_pages, k_scales, v_scales)
    b, n, h = q.shape
    counted = split_counts is not None
    if counted and (split_counts.shape != (b, k_pages.shape[2]) or split_counts.dtype != jnp.int32):
        raise ValueError(f"split_counts must be int32 of shape (batch, kv_heads) = {(b, k_pages.shape[2])}; "
                         f"got shape {split_counts.shape}, dtype {split_counts.dtype}")
    pool, page_size, kv_heads, _ = k_pages.shape
    scale = h ** -0.5 if scale is None else float(scale)
    chosen = _choose_backend(backend, head_dim=h, page_size=page_size, interpret=interpret)
    if chosen == "reference":
        out = reference.paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths,
                                                         scale=scale, k_scales=k_scales, v_scales=v_scales)
        return (out.astype(q.dtype), split_counts) if counted else out.astype(q.dtype)
    m = block_tables.shape[1]
    blocks = blocks or config.default_blocks(b, kv_heads, m, page_size)
    splits = pl.cdiv(m, blocks.pages_per_split)
    # Pad the table to whole splits with page 0 (never read past `lengths`); clip so a stale
    # entry can never address memory outside the pool.
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, pool - 1)
    tables = jnp.pad(tables, ((0, 0), (0, splits * blocks.pages_per_split - m)))
    tables = tables.reshape(b, splits, blocks.pages_per_split)
    group = n // kv_heads
    # Triton tiles are powers of 2: a group that is not one is padded to the next (>= 16) with
    # zero query rows; a power of 2 under 16 is repeated inside the kernel instead.
    qg = q.reshape(b, kv_heads, group, h)
    padded = group & (group - 1) != 0
    if padded:
        rows = max(MIN_DOT_ROWS, pl.next_power_of_2(group))
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    results = triton_decode.decode_partials(
        qg, k_pages, v_pages, tables, lengths.astype(jnp.int32).reshape(b, 1), scale=scale,
        blocks=blocks, interpret=interpret, k_scales=k_scales, v_scales=v_scales, split_counts=split_counts)
    if counted and triton_decode.merges_in_kernel(splits, qg.shape[2], h, blocks.num_warps):
        out, split_counts = results
    else:  # one split is the whole softmax (no merge: two kernels fewer, the decode step's latency)
        o, m_stat, l_stat = results
        out = o[:, :, 0] if splits == 1 else triton_decode.merge_splits(o, m_stat, l_stat)  # [B, K, Gp, H]
    if padded:
        out = out[:, :, :group]
    out = out.reshape(b, n, h).astype(q.dtype)
    return (out, split_counts) if counted else out


def _validate(q, k_pages, v_pages, block_tables, lengths, *, backend, blocks):
    """Raise ValueError naming the first bad value."""
    if getattr(q, "ndim", None) != 3:
        raise ValueError(f"q must be rank 3 [batch, heads, head_dim]; got q.shape={getattr(q, 'shape', None)}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be rank 4 [pages, page_size, kv_heads, head_dim]; "
                             f"got {name}.shape={getattr(x, 'shape', None)}")
    _api.check_float_dtype("q", q)
    if k_pages.dtype == v_pages.dtype and k_pages.dtype in CODE_DTYPES:
        pass  # quantized pages: their scales are checked by _validate_scales
    elif not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"q, k_pages, v_pages must share one dtype; got q.dtype={q.dtype}, "
                         f"k_pages.dtype={k_pages.dtype}, v_pages.dtype={v_pages.dtype}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages.shape={k_pages.shape} differs from v_pages.shape={v_pages.shape}")
    b, n, h = q.shape
    kv_heads, hk = k_pages.shape[2:]
    if h != hk:
        raise ValueError(f"head_dim differs: q has head_dim={h}, pages have head_dim={hk}")
    if n % kv_heads:
        raise ValueError(f"heads={n} is not divisible by kv_heads={kv_heads}; kv_heads must divide heads")
    for name, x, rank in (("block_tables", block_tables, 2), ("lengths", lengths, 1)):
        if getattr(x, "ndim", None) != rank or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array of rank {rank}; got shape="
                             f"{getattr(x, 'shape', None)}, dtype={getattr(x, 'dtype', None)}")
        if x.shape[0] != b:
            raise ValueError(f"{name}.shape[0]={x.shape[0]} differs from batch={b} (q.shape[0])")
    _api.check_backend(backend, BACKENDS)
    if blocks is not None and not isinstance(blocks, config.DecodeBlocks):
        raise ValueError(f"blocks={blocks!r} must be a config.DecodeBlocks or None")


def _validate_scales(k_pages, k_scales, v_scales):
    """int8/fp8 pages need both scale arrays [P, bs, K] bfloat16; float pages take none."""
    quantized = k_pages.dtype in CODE_DTYPES
    if (k_scales is None) != (v_scales is None) or quantized != (k_scales is not None):
        raise ValueError(f"int8/fp8 pages need k_scales and v_scales, float pages neither; got "
                         f"k_pages.dtype={k_pages.dtype}, k_scales given: {k_scales is not None}, "
                         f"v_scales given: {v_scales is not None}")
    for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if x is not None and (x.shape != k_pages.shape[:3] or x.dtype != reference.SCALE_DTYPE):
            raise ValueError(f"{name} must be bfloat16 of shape {k_pages.shape[:3]} (pages, page_size, "
                             f"kv_heads); got shape {x.shape}, dtype {x.dtype}")


def kernel_gap(head_dim: int, page_size: int) -> str | None:
    """Why the kernel cannot take these shapes (Triton tiles are powers of 2, dots >= 16 wide), or None."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim} is not a power of 2 >= 16"
    if page_size & (page_size - 1):
        return f"page_size={page_size} is not a power of 2"
    return None


def _choose_backend(backend: str, *, head_dim: int, page_size: int, interpret: bool) -> str:
    """Resolve "auto"; raise if "triton" was named and cannot serve the call."""
    warn = lambda reason: _api.warn_once(  # noqa: E731
        _log, _warned, f"paged_decode_attention: {reason}; using the reference backend")
    gap = kernel_gap(head_dim, page_size)
    if gap and backend == "triton":
        raise ValueError(f"backend='triton' cannot run: {gap}; use backend='reference'")
    if gap and backend == "auto":
        warn(gap)
        return "reference"
    return _api.triton_or_reference(backend, interpret, warn)
