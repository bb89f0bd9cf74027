"""Matrix-vector products for decoding (Pallas, Triton lowering), with the layer's neighbours fused.

A decode step multiplies a few activation rows by each weight once: the time is the weight's
bytes over the memory bandwidth, plus a launch for each small kernel around it. This kernel
takes the weight as [N, K] (out x in, so a program's rows are contiguous) and folds in the
RMSNorm before a projection (prologue), SwiGLU's gate and up projections (two weights, one
product) and the residual add after one (epilogue), and int8 weights with a scale per output
column. One program computes block_n output columns for every row, walking K in block_k steps
with Triton's software pipeline keeping num_stages weight tiles in flight. The products run
on tensor cores (rows repeated to a dot's 16) or as fp32 FMAs summed over each step (no
shared-memory staging: more programs fit an SM; the default for one row).

B rows (a power of 2 up to 16), K input width, N outputs, G weights (2 when gated).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._triton import dot_precision, one_copy, repeat_rows, row_copies
from pallas_kernels.matvec.config import MatvecBlocks


def _kernel(*refs, gated, roped, quantized, normed, has_residual, eps, block_k, dot, out_dtype, rope_heads,
            per_head, head_groups, n_cached):
    """One program: out[:, block] for a block of block_n output columns.

    Refs in order (optional ones only with their flag): x_ref [B, K]; w_ref [G, block_n, K]
    (the dtype of x, or int8 when quantized); scale_ref [G, block_n] (quantized); norm_ref [K]
    (normed); cos_ref, sin_ref [B, block_n] fp32 (roped); slot_ref [1] int32 (n_cached);
    res_ref [B, block_n] (has_residual); the n_cached caches' input refs (aliased to the last
    outputs, which are written instead); o_ref [B, block_n], or when roped one [B, 2, block_n]
    block per group of head_groups, the last n_cached of them [B, S, 2, block_n] cache blocks
    written at sequence slot slot_ref[0].
    roped: G = 2 holds the first and second halves of the same columns of one head (rotary
    pairs), rotated when the program's head, program_id // per_head, is below rope_heads; the
    result goes to the output of the group holding that head (head_groups: heads per output).
    """
    refs = list(refs)
    x_ref, w_ref = refs.pop(0), refs.pop(0)
    scale_ref = refs.pop(0) if quantized else None
    norm_ref = refs.pop(0) if normed else None
    cos_ref, sin_ref = (refs.pop(0), refs.pop(0)) if roped else (None, None)
    slot_ref = refs.pop(0) if n_cached else None
    res_ref = refs.pop(0) if has_residual else None
    o_refs = refs[n_cached:]  # past the caches' inputs
    rows, k_dim = x_ref.shape
    # A plain projection rounds once, to out_dtype; a gated or residual one rounds where the
    # model's layers do (each projection to x's dtype first).
    proj_dtype = x_ref.dtype if gated or has_residual else out_dtype
    n_weights, block_n = w_ref.shape[:2]
    dtype = x_ref.dtype
    copies = row_copies(rows) if dot else 1  # rows under a dot's 16 are repeated
    steps = pl.cdiv(k_dim, block_k)
    # The epilogue's residual, rotary tables and cache slot are read first: loads issue in program
    # order, and each read after the sums' barriers was one more round trip at a program's end
    # (-0.5% in the decode loop on an H100; the int8 scales, untried, are still read after).
    residual = res_ref[...] if has_residual else None
    cos, sin = (cos_ref[...], sin_ref[...]) if roped else (None, None)
    slot = slot_ref[0] if n_cached else None

    def k_slice(ref, i, *lead):
        """ref[*lead, step i's block_k columns], columns past K read as 0 (a ragged last step)."""
        if k_dim % block_k == 0:
            return ref[(*lead, pl.ds(i * block_k, block_k))]
        # (an int index as an array: the interpreter's masked load takes no Python ints)
        block = ref.at[(*(jnp.int32(x) if isinstance(x, int) else x for x in lead), pl.ds(i * block_k, block_k))]
        shape = (*(d for d, index in zip(ref.shape, lead) if isinstance(index, slice)), block_k)
        inside = i * block_k + jnp.arange(block_k) < k_dim
        return plgpu.load(block, mask=jnp.broadcast_to(inside, shape), other=0)

    if normed:  # RMSNorm statistics first: x is a few KB, read again from cache below
        def sum_squares(i, total):
            xk = k_slice(x_ref, i, slice(None)).astype(jnp.float32)
            return total + jnp.sum(xk * xk, axis=1)

        rstd = lax.rsqrt(lax.fori_loop(0, steps, sum_squares, jnp.zeros((rows,), jnp.float32)) / k_dim + eps)

    def step(i, accs):
        xk = k_slice(x_ref, i, slice(None))
        if normed:  # rounded to x's dtype as the model's norm output is
            xk = (xk.astype(jnp.float32) * rstd[:, None]
                  * k_slice(norm_ref, i).astype(jnp.float32)[None, :]).astype(dtype)
        out = []
        for g, acc in enumerate(accs):
            wk = k_slice(w_ref, i, g, slice(None))  # [block_n, block_k]
            if dot:
                out.append(acc + plgpu.dot(repeat_rows(xk, copies), wk.astype(dtype), trans_b=True,
                                           precision=dot_precision(dtype)))
            else:  # [B, 1, block_k] * [1, block_n, block_k], summed over the step's K
                products = (xk.astype(jnp.float32)[:, None, :] * wk.astype(jnp.float32)[None, :, :])
                out.append(acc + jnp.sum(products, axis=2))
        return tuple(out)

    zeros = jnp.zeros((copies * rows, block_n), jnp.float32)
    accs = lax.fori_loop(0, steps, step, (zeros,) * n_weights)
    ys = []
    for g, acc in enumerate(accs):
        y = one_copy(acc, copies)
        if quantized:
            y = y * scale_ref[g, :].astype(jnp.float32)[None, :]
        ys.append(y.astype(proj_dtype))
    if roped:  # rotary embedding of the halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        head = pl.program_id(0) // per_head
        cos = jnp.where(head < rope_heads, cos, 1.0)
        sin = jnp.where(head < rope_heads, sin, 0.0)
        first, second = ys[0].astype(jnp.float32), ys[1].astype(jnp.float32)
        first, second = (first * cos - second * sin).astype(dtype), (second * cos + first * sin).astype(dtype)
        if len(o_refs) == 1:
            o_refs[0][:, 0, :], o_refs[0][:, 1, :] = first, second
            return
        start = 0
        for index, (o_ref, count) in enumerate(zip(o_refs, head_groups)):
            @pl.when((head >= start) & (head < start + count))
            def _(o_ref=o_ref, cached=index >= len(head_groups) - n_cached):
                at = (slice(None), slot) if cached else (slice(None),)  # a cache: this token's slot
                o_ref[(*at, 0, slice(None))] = first
                o_ref[(*at, 1, slice(None))] = second
            start += count
        return
    if gated:  # SwiGLU: silu(gate) * up
        gate, up = ys[0].astype(jnp.float32), ys[1].astype(jnp.float32)
        y = (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype)
    else:
        (y,) = ys
    if has_residual:
        y = (residual.astype(jnp.float32) + y.astype(jnp.float32)).astype(dtype)
    (o_ref,) = o_refs
    o_ref[...] = y


def matvec_kernel(x, w, *, w_scale, norm_weight, eps, residual, out_dtype, blocks: MatvecBlocks,
                  interpret: bool, rope=None, head_groups=None, caches=(), cache_slot=None):
    """x [B, K] (B a power of 2 <= 16), w [G, N, K], w_scale [G, N] or None, norm_weight [K] or
    None, residual [B, N] or None -> a tuple of one [B, N] in out_dtype. G = 2 is SwiGLU (gate, up).
    rope: None or (cos, sin [B, H/2] fp32, rotated heads) with G = 1: each program takes
    block_n / 2 rows from each half of one head, so it holds both members of its rotary pairs;
    the tuple then holds one [B, count * H] array per count of head_groups (default: all heads).
    caches: with rope, [B, S, count, H] arrays for the last groups of head_groups, written at
    sequence slot cache_slot ([1] int32) in place (aliased) and returned in those groups' places."""
    rows, k_dim = x.shape
    n_weights, n, _ = w.shape
    bn = blocks.block_n
    per_head = 1
    if rope is None:
        grid = n // bn
        weight_spec = pl.BlockSpec((n_weights, bn, k_dim), lambda i: (0, i, 0))
        scale_spec = pl.BlockSpec((n_weights, bn), lambda i: (0, i))
        columns = pl.BlockSpec((rows, bn), lambda i: (0, i))
        out_specs, out_shapes = [columns], [(rows, n)]
    else:  # weights as [heads, 2, H/2, K]; program i: head i // per_head, part i % per_head
        half = rope[0].shape[-1]
        bn //= 2
        per_head = half // bn
        heads = n // (2 * half)
        head_groups = head_groups or (heads,)
        grid = heads * per_head
        w = w.reshape(heads, 2, half, k_dim)
        w_scale = None if w_scale is None else w_scale.reshape(heads, 2, half)
        weight_spec = pl.BlockSpec((None, 2, bn, k_dim), lambda i: (i // per_head, 0, i % per_head, 0))
        scale_spec = pl.BlockSpec((None, 2, bn), lambda i: (i // per_head, 0, i % per_head))
        columns = pl.BlockSpec((rows, bn), lambda i: (0, i % per_head))  # of cos, sin
        if len(head_groups) == 1:
            out_specs = [pl.BlockSpec((rows, None, 2, bn), lambda i: (0, i // per_head, 0, i % per_head))]
            out_shapes = [(rows, heads, 2, half)]
        else:  # a program outside a group maps to one of its blocks and leaves it unwritten
            out_specs, out_shapes, start = [], [], 0
            for index, count in enumerate(head_groups):
                cached = index >= len(head_groups) - len(caches)
                in_group = lambda i, start=start, count=count: jnp.clip(i // per_head - start, 0, count - 1)  # noqa: E731
                if cached:  # the whole sequence axis: the slot is a value, not known to the grid
                    seq = caches[0].shape[1]
                    out_specs.append(pl.BlockSpec((rows, seq, None, 2, bn), lambda i, in_group=in_group: (
                        0, 0, in_group(i), 0, i % per_head)))
                    out_shapes.append((rows, seq, count, 2, half))
                else:
                    out_specs.append(pl.BlockSpec((rows, None, 2, bn), lambda i, in_group=in_group: (
                        0, in_group(i), 0, i % per_head)))
                    out_shapes.append((rows, count, 2, half))
                start += count
    operands, specs = [x, w], [pl.BlockSpec((rows, k_dim), lambda i: (0, 0)), weight_spec]
    if w_scale is not None:
        operands.append(w_scale)
        specs.append(scale_spec)
    if norm_weight is not None:
        operands.append(norm_weight)
        specs.append(pl.BlockSpec((k_dim,), lambda i: (0,)))
    if rope is not None:
        operands += [rope[0], rope[1]]
        specs += [columns, columns]
    if caches:
        operands.append(cache_slot)
        specs.append(pl.BlockSpec((1,), lambda i: (0,)))
    if residual is not None:
        operands.append(residual)
        specs.append(columns)
    first_cache = len(operands)
    operands += [c.reshape(out_shapes[-len(caches) + j]) for j, c in enumerate(caches)]
    specs += out_specs[len(out_specs) - len(caches):]
    kernel = functools.partial(_kernel, gated=n_weights == 2, roped=rope is not None,
                               quantized=w_scale is not None, normed=norm_weight is not None,
                               has_residual=residual is not None, eps=eps, block_k=blocks.block_k,
                               dot=blocks.dot, out_dtype=jnp.dtype(out_dtype),
                               rope_heads=None if rope is None else rope[2], per_head=per_head,
                               head_groups=head_groups, n_cached=len(caches))
    ys = pl.pallas_call(
        kernel,
        grid=(grid,),
        in_specs=specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(shape, out_dtype) for shape in out_shapes],
        input_output_aliases={first_cache + j: len(out_shapes) - len(caches) + j for j in range(len(caches))},
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="matvec",
    )(*operands)
    n_plain = len(ys) - len(caches)
    return (*(y.reshape(rows, -1) for y in ys[:n_plain]),
            *(y.reshape(c.shape) for y, c in zip(ys[n_plain:], caches)))
