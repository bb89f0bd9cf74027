"""matvec: input checks, backend choice and row padding around the Pallas kernel.

B rows, K input width, N outputs.
"""
import logging
import operator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _api
from pallas_kernels.matvec import config, reference, triton_matvec

BACKENDS = ("auto", "reference", "triton")
MAX_ROWS = 16  # a decode step's rows; beyond them the product is a GEMM: use one

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def matvec(x, w, *, w_scale=None, norm_weight=None, eps: float = 1e-5, residual=None, gated: bool = False,
           out_dtype=None, rope=None, head_groups=None, caches=None, cache_slot=None, backend: str = "auto",
           interpret: bool = False, blocks: config.MatvecBlocks | None = None):
    """y = x' W^T for a few rows x (a decode step's activations), with the layer's neighbours
    fused: x' = RMSNorm(x) * norm_weight when norm_weight is given, else x.

    Args:
      x: [B, K], float32, bfloat16 or float16, 1 <= B <= 16.
      w: [N, K] (out x in: each output column's weights contiguous), x's dtype or int8; gated:
        [2, N, K], the gate and up projections of SwiGLU, and the result is silu(x' Wg^T) * x' Wu^T.
      w_scale: int8 w only: [N] ([2, N] gated), the scale of each output column.
      norm_weight: [K], or None for no norm. eps: the norm's epsilon.
      residual: [B, N], added to the result (the block's residual stream).
      out_dtype: the result's dtype for a plain projection (no gate, no residual), e.g. fp32
        logits, rounded once from the fp32 accumulator; default x's.
      rope: None, or (cos, sin, rotated_heads) to apply rotary embeddings to the result, a
        projection to heads of H = 2 * cos.shape[-1] columns (q|k|v): cos, sin [B, H/2] fp32 (the
        angles of each row's position), the first rotated_heads heads turned (halves layout, as
        llmjax.models.transformer.apply_rope) and the rest (v) passed through. Not with gated or
        residual.
      head_groups: with rope, the result split by heads into separate arrays (e.g. (N, K, K) for
        q, k, v), written by the kernel directly, so no slice of one result follows it.
      caches, cache_slot: with head_groups, a decode step's KV-cache write. caches: a tuple of
        [B, S, count, H] arrays in x's dtype, one for each of the last len(caches) groups (k, v);
        cache_slot: an int scalar, the rows' position; a traced one outside [0, S) is taken in as
        lax.dynamic_update_slice takes its index (negative counts from the end, then clipped),
        a concrete one outside raises. Those groups are stored
        at [:, cache_slot] of their caches instead of returned, and the updated caches take
        their places in the result. The kernel writes them in place (aliased): under jit with
        the caches donated or carried through a loop no cache is copied; otherwise XLA copies
        each cache once a call. Rows that are not a power of 2 are written after the kernel.
      backend: "auto" (the Triton kernel on a GPU or with interpret=True, else the reference;
        shapes the kernel's blocks do not divide fall back, logged once), "reference", "triton".
      interpret: run the Triton kernel in Pallas interpret mode (CPU tests).
      blocks: `config.MatvecBlocks`; default `config.default_blocks(N, K, B)`.
    Returns:
      [B, N] (with head_groups, a tuple of [B, count * H], the cached groups' updated caches in
      their places) in out_dtype (x's by default), rounded where the unfused layer rounds
      (reference.py).
    Raises:
      ValueError: bad rank, dtype, shape, backend, blocks, caches or cache_slot; the message names
        the value.
    """
    _validate(x, w, w_scale, norm_weight, residual, gated, backend, blocks)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if out_dtype not in _api.FLOAT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype.name} unsupported; use float32, bfloat16 or float16")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} must be a positive number")
    if head_groups is not None and rope is None:
        raise ValueError("head_groups splits a rotary projection's heads; it needs rope")
    if rope is not None:
        _validate_rope(rope, x, w, gated, residual, head_groups)
        if out_dtype != x.dtype:
            raise ValueError(f"out_dtype={out_dtype.name} does not go with rope (the result is x's dtype)")
        rope = (rope[0], rope[1], operator.index(rope[2]))
        head_groups = None if head_groups is None else tuple(map(operator.index, head_groups))
    caches = _validate_caches(caches, cache_slot, x, head_groups, None if rope is None else 2 * rope[0].shape[-1])
    if out_dtype != x.dtype and (gated or residual is not None):
        raise ValueError(f"out_dtype={out_dtype.name} applies to a plain projection; a gated or residual "
                         f"one returns x's dtype ({jnp.dtype(x.dtype).name})")
    rows, k = x.shape
    n = w.shape[-2]
    chosen = _api.triton_or_reference(backend, interpret, lambda why: _api.warn_once(
        _log, _warned, f"matvec: {why}; using the reference"))
    blocks = blocks or config.default_blocks(n, k, rows)
    gap = config.kernel_gap(n, k, blocks, None if rope is None else 2 * rope[0].shape[-1])
    if chosen == "triton" and gap:
        if backend == "triton":
            raise ValueError(f"matvec backend='triton': {gap}")
        _api.warn_once(_log, _warned, f"matvec: {gap}; using the reference")
        chosen = "reference"
    if chosen == "reference":
        y = reference.matvec_reference(x, w, w_scale=w_scale, norm_weight=norm_weight, eps=eps,
                                       residual=residual, gated=gated, out_dtype=out_dtype, rope=rope)
        if head_groups is None:
            return y
        bounds = 2 * rope[0].shape[-1] * np.cumsum(head_groups)[:-1]
        return _write_caches(jnp.split(y, bounds, axis=-1), caches, cache_slot)
    stacked = lambda a: a if a is None or gated else a[None]  # noqa: E731  the kernel's [G, ...]
    padded = 1 << (rows - 1).bit_length()  # the kernel takes a power of 2 of rows
    # The cache blocks span the rows: padded rows (not a power of 2) store their groups afterwards.
    in_kernel = caches if padded == rows else ()
    pad = lambda a: a if a is None or padded == rows else jnp.pad(a, ((0, padded - rows), (0, 0)))  # noqa: E731
    ys = triton_matvec.matvec_kernel(pad(x), stacked(w), w_scale=stacked(w_scale), norm_weight=norm_weight,
                                     eps=eps, residual=pad(residual), out_dtype=out_dtype, blocks=blocks,
                                     interpret=interpret,
                                     rope=None if rope is None else (pad(rope[0]), pad(rope[1]), rope[2]),
                                     head_groups=head_groups, caches=in_kernel,
                                     cache_slot=None if not in_kernel else _clipped_slot(cache_slot, caches))
    if head_groups is None:
        return ys[0] if padded == rows else ys[0][:rows]
    if in_kernel:
        return ys
    return _write_caches([y[:rows] for y in ys], caches, cache_slot)


def _clipped_slot(cache_slot, caches):
    """cache_slot as the kernel's [1] int32, taken into the caches' positions as
    lax.dynamic_update_slice takes its index (the jnp write's): a negative one counts from the
    end, then it is clipped. A pointer store has no bounds of its own."""
    seq = caches[0].shape[1]
    slot = jnp.asarray(cache_slot, jnp.int32)
    return jnp.clip(jnp.where(slot < 0, slot + seq, slot), 0, seq - 1).reshape(1)


def _write_caches(groups, caches, cache_slot):
    """The result tuple: the last len(caches) groups [B, count * H] stored at cache_slot of their
    caches [B, S, count, H] (the kernel's in-place write, as jnp)."""
    groups = list(groups)
    start = len(groups) - len(caches)
    for i, cache in enumerate(caches):
        rows = groups[start + i].reshape(cache.shape[0], 1, *cache.shape[2:])
        groups[start + i] = jax.lax.dynamic_update_slice_in_dim(cache, rows.astype(cache.dtype), cache_slot, axis=1)
    return tuple(groups)


def _validate_caches(caches, cache_slot, x, head_groups, head_dim) -> tuple:
    """caches as a tuple (empty for none), checked against head_groups and x."""
    if caches is None:
        if cache_slot is not None:
            raise ValueError("cache_slot goes with caches; got cache_slot without caches")
        return ()
    if head_groups is None or not isinstance(caches, tuple) or not 1 <= len(caches) < len(head_groups):
        count = len(caches) if isinstance(caches, (tuple, list)) else "?"
        raise ValueError(f"caches must be a tuple of 1 to len(head_groups) - 1 arrays, one for each of the last "
                         f"groups, and need head_groups; got a {type(caches).__name__} of {count} with "
                         f"head_groups={head_groups}")
    rows = x.shape[0]
    first = _shape(caches[0])
    seq = first[1] if first is not None and len(first) == 4 else None
    for i, (count, cache) in enumerate(zip(head_groups[len(head_groups) - len(caches):], caches)):
        shape = _shape(cache)
        if shape != (rows, seq, count, head_dim) or getattr(cache, "dtype", None) != x.dtype:
            raise ValueError(f"caches[{i}] must be [rows={rows}, S, heads of its group={count}, head_dim={head_dim}] "
                             f"of x's dtype ({jnp.dtype(x.dtype).name}), one S for all; got shape {shape}, "
                             f"dtype {getattr(cache, 'dtype', None)}")
    if (getattr(cache_slot, "ndim", 0) != 0 or not jnp.issubdtype(getattr(cache_slot, "dtype", type(cache_slot)),
                                                                  jnp.integer)):
        raise ValueError(f"cache_slot must be an int scalar (the rows' position); got {cache_slot!r}")
    if _count(cache_slot) is not None and not 0 <= cache_slot < seq:
        raise ValueError(f"cache_slot={cache_slot} is outside the caches' {seq} positions")
    return caches


def _validate(x, w, w_scale, norm_weight, residual, gated, backend, blocks):
    _api.check_backend(backend, BACKENDS)
    if getattr(x, "ndim", None) != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be [rows, K] with 1 <= rows <= {MAX_ROWS}; got shape "
                         f"{getattr(x, 'shape', None)}")
    _api.check_float_dtype("x", x)
    want = 3 if gated else 2
    if getattr(w, "ndim", None) != want or (gated and w.shape[0] != 2) or w.shape[-1] != x.shape[1]:
        layout = "[2, N, K] (gate, up)" if gated else "[N, K]"
        raise ValueError(f"w must be {layout} with K = x.shape[1] = {x.shape[1]}; got shape "
                         f"{getattr(w, 'shape', None)}")
    quantized = jnp.dtype(w.dtype) == jnp.int8
    if not quantized and w.dtype != x.dtype:
        raise ValueError(f"w dtype={jnp.dtype(w.dtype).name} must be x's ({jnp.dtype(x.dtype).name}) or int8")
    if quantized != (w_scale is not None):
        raise ValueError("w_scale goes with an int8 w and only with one; got "
                         f"w dtype={jnp.dtype(w.dtype).name}, w_scale={'given' if w_scale is not None else None}")
    if w_scale is not None and (_shape(w_scale) != tuple(w.shape[:-1]) or not _floating(w_scale)):
        raise ValueError(f"w_scale must be a float array {tuple(w.shape[:-1])} (one scale an output "
                         f"column); got {_shape(w_scale)} {getattr(w_scale, 'dtype', None)}")
    if norm_weight is not None and (_shape(norm_weight) != (x.shape[1],) or not _floating(norm_weight)):
        raise ValueError(f"norm_weight must be a float array [{x.shape[1]}]; got {_shape(norm_weight)} "
                         f"{getattr(norm_weight, 'dtype', None)}")
    if residual is not None and (_shape(residual) != (x.shape[0], w.shape[-2])
                                 or getattr(residual, "dtype", None) != x.dtype):
        raise ValueError(f"residual must be [{x.shape[0]}, {w.shape[-2]}] of x's dtype; got "
                         f"{_shape(residual)} {getattr(residual, 'dtype', None)}")
    if blocks is not None and not isinstance(blocks, config.MatvecBlocks):
        raise ValueError(f"blocks={blocks!r} must be a config.MatvecBlocks or None")


def _shape(a):
    shape = getattr(a, "shape", None)
    return None if shape is None else tuple(shape)


def _floating(a) -> bool:
    return jnp.issubdtype(getattr(a, "dtype", jnp.int32), jnp.floating)


def _count(value) -> int | None:
    """value as an int if it is an integer (Python, numpy or jax scalar; not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _validate_rope(rope, x, w, gated, residual, head_groups):
    if not isinstance(rope, tuple) or len(rope) != 3:
        raise ValueError(f"rope must be (cos, sin, rotated_heads); got {type(rope).__name__}")
    cos, sin, heads = rope
    if gated or residual is not None:
        raise ValueError("rope applies to a plain projection (q|k|v), not with gated or residual")
    rows, n = x.shape[0], w.shape[-2]
    for name, table in (("cos", cos), ("sin", sin)):
        if getattr(table, "ndim", None) != 2 or table.shape[0] != rows or table.dtype != jnp.float32:
            raise ValueError(f"rope {name} must be fp32 [rows={rows}, head_dim / 2]; got "
                             f"{getattr(table, 'shape', None)} {getattr(table, 'dtype', None)}")
    if cos.shape != sin.shape or n % (2 * cos.shape[1]):
        raise ValueError(f"rope cos {cos.shape} and sin {sin.shape} must match, and N={n} must be whole "
                         f"heads of 2 * {cos.shape[1]} columns")
    total = n // (2 * cos.shape[1])
    if _count(heads) is None or not 0 <= _count(heads) <= total:
        raise ValueError(f"rope rotated_heads={heads!r} must be an int in [0, {total}]")
    if head_groups is not None and (not isinstance(head_groups, tuple)
                                    or any(_count(c) is None or _count(c) < 1 for c in head_groups)
                                    or sum(map(int, head_groups)) != total):
        raise ValueError(f"head_groups={head_groups!r} must be a tuple of positive ints summing to the "
                         f"{total} heads")
