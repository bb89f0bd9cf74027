"""One chunk's softmax statistics and logit gradient in one Pallas kernel (Triton lowering).

Given a chunk's logits [rows, vocab] (from cuBLAS, in the inputs' dtype), a program owns block_rows
rows and walks them in block_cols tiles twice. Pass 1: the online log-sum-exp (running max and
rescaled sum, as in pallas_kernels/softmax) and the label's logit. Pass 2, when gradients are
wanted: dlogits = coef * (1 + 2 z_loss lse) * exp(x - lse) - coef * onehot(label), written in the
logits' dtype. Two reads and one write of the logits, where XLA's fusions of the same math read
them three times (max, sum of exp, gradient; GPT-2 124M on an H200: 290 us per 2048-token chunk).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.softmax import config as softmax_config
from pallas_kernels.softmax.triton_fwd import finite_or_zero, row_tile_loader

# (block_rows, block_cols, num_warps) for rows wider than one tile (vocabularies): the fastest of
# a sweep on an H200 over a GPT-2 chunk, [2048, 50304] bf16 (benchmarks/NOTES.md, 2026-12-04).
LONG_ROW_TILE = (1, 2048, 4)


def default_config(n_rows: int, n_cols: int) -> softmax_config.SoftmaxConfig:
    """The softmax kernels' heuristic, with LONG_ROW_TILE where a row spans several tiles."""
    config = softmax_config.default_config(n_rows, n_cols)
    if config.block_cols >= n_cols:
        return config
    block_rows, block_cols, num_warps = LONG_ROW_TILE
    return softmax_config.SoftmaxConfig(block_rows=min(block_rows, pl.next_power_of_2(n_rows)),
                                        block_cols=block_cols, num_warps=num_warps)


def _kernel(logits_ref, labels_ref, coef_ref, lse_ref, label_logit_ref, *dlogits_ref, n_rows, n_cols,
            block_rows, block_cols, z_loss):
    """labels: [rows] int32, -1 where no column is the label (ignored or padding tokens);
    coef: [rows] fp32, each token's weight in the differentiated total. dlogits_ref is absent
    when no gradient is wanted."""
    load = row_tile_loader(logits_ref, n_rows=n_rows, n_cols=n_cols, block_rows=block_rows,
                           block_cols=block_cols, other=-jnp.inf)
    start = pl.program_id(0) * block_rows
    rows = pl.ds(start, block_rows)
    row_ok = start + jnp.arange(block_rows) < n_rows
    labels = plgpu.load(labels_ref.at[rows], mask=row_ok, other=-1)
    n_tiles = pl.cdiv(n_cols, block_cols)

    def is_label(c0):
        return (c0 + jnp.arange(block_cols))[None, :] == labels[:, None]

    # The sums stay per lane ([block_rows, block_cols]) until the loop ends: one cross-thread
    # reduction (the max) per tile instead of three.
    def accumulate(k, carry):
        m, total, picked = carry
        x, _, _ = load(k * block_cols)  # [block_rows, block_cols] fp32; masked entries -inf
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        shift = finite_or_zero(m_new)[:, None]
        total = total * jnp.exp(m[:, None] - shift) + jnp.exp(x - shift)
        picked = picked + jnp.where(is_label(k * block_cols), x, 0.0)
        return m_new, total, picked

    lanes = jnp.zeros((block_rows, block_cols), jnp.float32)
    m, total, picked = lax.fori_loop(0, n_tiles, accumulate,
                                     (jnp.full((block_rows,), -jnp.inf, jnp.float32), lanes, lanes))
    lse = finite_or_zero(m) + jnp.log(jnp.sum(total, axis=1))
    plgpu.store(lse_ref.at[rows], lse, mask=row_ok)
    plgpu.store(label_logit_ref.at[rows], jnp.sum(picked, axis=1), mask=row_ok)
    if not dlogits_ref:
        return
    coef = plgpu.load(coef_ref.at[rows], mask=row_ok, other=0.0)
    scale = coef * (1.0 + 2.0 * z_loss * lse)

    def write(k, carry):
        x, mask, index = load(k * block_cols)
        d = jnp.exp(x - lse[:, None]) * scale[:, None] - jnp.where(is_label(k * block_cols), coef[:, None], 0.0)
        plgpu.store(dlogits_ref[0].at[index], d.astype(dlogits_ref[0].dtype), mask=mask)
        return carry

    lax.fori_loop(0, n_tiles, write, 0)


def softmax_stats_and_grad(logits, labels, coef, *, z_loss: float, with_grads: bool, interpret: bool,
                           config=None):
    """logits: [rows, vocab]; labels: [rows] int32 (-1: no label); coef: [rows] fp32. config: a
    pallas_kernels.softmax.SoftmaxConfig (tile and warps), default its heuristic.

    Returns (lse [rows] fp32, label_logit [rows] fp32 (0 where labels is -1), dlogits [rows, vocab]
    in logits.dtype, or None without with_grads).
    """
    n_rows, n_cols = logits.shape
    config = config or default_config(n_rows, n_cols)
    kernel = functools.partial(_kernel, n_rows=n_rows, n_cols=n_cols, block_rows=config.block_rows,
                               block_cols=config.block_cols, z_loss=z_loss)
    stats = jax.ShapeDtypeStruct((n_rows,), jnp.float32)
    out_shape = (stats, stats) + ((jax.ShapeDtypeStruct(logits.shape, logits.dtype),) if with_grads else ())
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_rows, config.block_rows),),  # row tiles of block_rows rows
        in_specs=[pl.no_block_spec] * 3,
        out_specs=[pl.no_block_spec] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="cross_entropy_chunk",
    )(logits, labels.astype(jnp.int32), coef.astype(jnp.float32))
    return outs[0], outs[1], (outs[2] if with_grads else None)
