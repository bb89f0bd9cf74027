"""grouped_matmul: a drop-in for `jax.lax.ragged_dot` with Pallas kernels, and the padded-layout
form that a chain of grouped matmuls over the same rows (an expert MLP) shares.

Y[i] = X[i] @ W[group of row i]. Backends: "triton" (Pallas, Triton lowering; CPU: interpret
mode), "mosaic" (Pallas Mosaic GPU forward and dX on Hopper, 16-bit; dW by the Triton kernel),
"xla" (`lax.ragged_dot`: XLA's GPU rewriter expands it to a dense dot over all groups, G times
the FLOPs), "reference" (a loop over groups in fp32). The kernel paths move rows into the
padded layout (layout.py), run the rows kernel (triton_fwd.py or mosaic_fwd.py), and move them
back; the custom_vjp runs the rows kernel on W transposed for dX and triton_bwd.py for dW.
"""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.grouped_matmul import config, mosaic_fwd, reference, triton_bwd, triton_fwd
from pallas_kernels.grouped_matmul.layout import (GroupLayout, layout_from_sizes, make_layout,
                                                  pad_rows, unpad_rows)
from pallas_kernels.matmul.config import MosaicTiles, TritonBlocks

BACKENDS = ("auto", "reference", "xla", "triton", "mosaic")
KERNEL_BACKENDS = ("triton", "mosaic")

_log = logging.getLogger(__name__)
_warned: set[str] = set()

__all__ = ["grouped_matmul", "padded_grouped_matmul", "make_layout", "layout_from_sizes",
           "pad_rows", "unpad_rows", "GroupLayout"]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Non-differentiable options of one kernel call (hashable, for custom_vjp)."""
    backend: str  # "triton" or "mosaic": the rows kernel (dW is always Triton)
    out_dtype: jnp.dtype
    blocks: TritonBlocks | MosaicTiles | None  # rows kernel, forward only; None: heuristic
    interpret: bool


def _pad_axis(a, axis, multiple):
    """Zero-pad one axis up to a multiple: zeros add nothing to a product."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _vary_alike(*arrays):
    """Inside jax.shard_map (check_vma), make every operand vary over the union of the mesh
    axes any of them varies over, so a pallas_call's output can take the same manual axis type
    (triton_fwd/triton_bwd read it from their first operand). Done outside the custom_vjp, so
    autodiff transposes the casts (a psum of dW over the axes only the rows vary over).
    Outside shard_map: unchanged."""
    union = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))
    return tuple(a if jax.typeof(a).manual_axis_type.varying == union else
                 jax.lax.pcast(a, tuple(union - jax.typeof(a).manual_axis_type.varying), to="varying")
                 for a in arrays)


def _rows(x, w, tile_group, *, transpose_w, out_dtype, static, blocks):
    """The rows kernel of static.backend, K and N padded to its tiles and N cut back:
    [P, K] @ W[g] ([G, K, N]), or with transpose_w [P, N] @ W[g]^T."""
    tile_m = x.shape[0] // tile_group.shape[0]
    if static.backend == "mosaic":
        if transpose_w:  # the Mosaic kernel reads W untransposed: one copy of the weights
            w = jnp.swapaxes(w, 1, 2)
        n = w.shape[2]
        tiles = blocks or config.default_mosaic_tiles(tile_m, n)
        y = mosaic_fwd.grouped_matmul(_pad_axis(x, 1, tiles.tile_k),
                                      _pad_axis(_pad_axis(w, 1, tiles.tile_k), 2, tiles.cta_n),
                                      tile_group, out_dtype=out_dtype, tiles=tiles,
                                      interpret=static.interpret)
        return y[:, :n]
    k_axis, n_axis = (2, 1) if transpose_w else (1, 2)
    n = w.shape[n_axis]
    blocks = blocks or config.default_blocks(tile_m, n, x.shape[1], x.dtype)
    x = _pad_axis(x, 1, blocks.block_k)
    w = _pad_axis(_pad_axis(w, k_axis, blocks.block_k), n_axis, blocks.block_n)
    y = triton_fwd.grouped_matmul(x, w, tile_group, transpose_w=transpose_w, out_dtype=out_dtype,
                                  blocks=blocks, interpret=static.interpret)
    return y[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_matmul(x, w, tile_group, first_tile, tiles, static: _Static):
    return _rows(x, w, tile_group, transpose_w=False, out_dtype=static.out_dtype, static=static,
                 blocks=static.blocks)


def _kernel_matmul_fwd(x, w, tile_group, first_tile, tiles, static):
    return _kernel_matmul(x, w, tile_group, first_tile, tiles, static), (x, w, tile_group, first_tile, tiles)


def _kernel_matmul_bwd(static, residuals, dy):
    """dX = dY @ W[g]^T by the rows kernel, dW[g] = X_g^T dY_g by the Triton weight-gradient
    kernel; the index arrays get no cotangent."""
    x, w, tile_group, first_tile, tiles = residuals
    dy = dy.astype(x.dtype)
    dx = _rows(dy, w, tile_group, transpose_w=True, out_dtype=x.dtype, static=static, blocks=None)
    k, n = x.shape[1], dy.shape[1]
    blocks = config.default_weight_grad_blocks(k, n, x.dtype)
    dw = triton_bwd.weight_grad(_pad_axis(x, 1, blocks.block_m), _pad_axis(dy, 1, blocks.block_n),
                                first_tile, tiles, tile_m=x.shape[0] // tile_group.shape[0],
                                out_dtype=w.dtype, blocks=blocks, interpret=static.interpret)
    return dx, dw[:, :k, :n], None, None, None


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def _check_operands(x, w, what):
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must be rank 2 [rows, K]; got x.shape={getattr(x, 'shape', None)}")
    if getattr(w, "ndim", None) != 3:
        raise ValueError(f"w must be rank 3 [groups, K, N]; got w.shape={getattr(w, 'shape', None)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x.shape={x.shape} and w.shape={w.shape}: x's columns must equal w's K")
    _api.check_float_dtype("x", x)
    if x.dtype != w.dtype:
        raise ValueError(f"{what} needs x and w of one dtype; got x.dtype={jnp.dtype(x.dtype).name}, "
                         f"w.dtype={jnp.dtype(w.dtype).name}")


def _check_options(out_dtype, interpret, blocks):
    if jnp.dtype(out_dtype) not in _api.FLOAT_DTYPES:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name} unsupported; use one of "
                         f"{[d.name for d in _api.FLOAT_DTYPES]}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be a bool")
    if blocks is not None and not isinstance(blocks, (TritonBlocks, MosaicTiles)):
        raise ValueError(f"blocks={blocks!r} must be a matmul.config.TritonBlocks, MosaicTiles or None")


def _check_kernel_backend(backend, dtype, tile_m, blocks, interpret):
    """Raise ValueError unless the kernel backend can run: a GPU or interpret mode; for
    "mosaic" also Hopper (or interpret), 16-bit inputs and a row tile of 64..256."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend={backend!r} unknown; use one of {KERNEL_BACKENDS}")
    wanted = MosaicTiles if backend == "mosaic" else TritonBlocks
    if blocks is not None and not isinstance(blocks, wanted):
        raise ValueError(f"backend={backend!r} takes blocks of type {wanted.__name__}; "
                         f"got {type(blocks).__name__}")
    _api.triton_or_reference("triton", interpret, None)  # raises without a GPU or interpret
    if backend != "mosaic":
        return
    if jnp.dtype(dtype) not in mosaic_fwd.DTYPES:
        raise ValueError(f"dtype={jnp.dtype(dtype).name} unsupported by backend='mosaic'; use "
                         "bfloat16 or float16, or backend='triton'")
    if tile_m % 64 or not 64 <= tile_m <= 256:
        raise ValueError(f"backend='mosaic' needs a row tile tile_m of 64, 128, 192 or 256; got {tile_m}")
    if not interpret and not _targets_hopper():
        raise ValueError(f"backend='mosaic' needs an sm_90 GPU (Hopper) or interpret=True; got "
                         f"{jax.devices()[0].device_kind!r}")


_targets_hopper = _api.targets_hopper


def auto_backend(dtype) -> str:
    """The kernel backend "auto" runs on a GPU: "mosaic" on Hopper for 16-bit inputs (in
    bench_moe on our H100 it reached 0.69-0.77x the dense MLP's rate, the Triton kernel
    0.59-0.63x; benchmarks/results/moe-llama_*), else "triton"."""
    return "mosaic" if jnp.dtype(dtype) in mosaic_fwd.DTYPES and _targets_hopper() else "triton"


def padded_grouped_matmul(xp, w, layout: GroupLayout, *, out_dtype=None, backend="triton",
                          interpret=False, blocks=None):
    """Grouped matmul of rows already in the padded layout, by the Pallas kernels.

    Args:
      xp: [P, K] rows in `layout` (pad_rows); w: [G, K, N], xp's dtype.
      layout: from make_layout / layout_from_sizes; G = layout.n_groups.
      out_dtype: default xp.dtype.
      backend: "triton" or "mosaic" (the rows kernel; dW is Triton either way).
      interpret: run the kernels in interpret mode (CPU; "mosaic" inside an abstract GPU mesh,
        see test_grouped_matmul.py).
      blocks: the rows kernel's TritonBlocks (block_m == layout.tile_m) or MosaicTiles
        (cta_m == layout.tile_m); default: heuristic.
    Returns:
      [P, N] in the same layout (padding rows and spare tiles 0 when xp's are);
      differentiable in xp and w.
    Raises:
      ValueError: bad shapes, dtypes, options, blocks not matching the layout, or no GPU
        without interpret=True.
    """
    _check_operands(xp, w, "padded_grouped_matmul")
    out_dtype = jnp.dtype(xp.dtype if out_dtype is None else out_dtype)
    _check_options(out_dtype, interpret, blocks)
    if xp.shape[0] != layout.padded_source.shape[0] or w.shape[0] != layout.n_groups:
        raise ValueError(f"xp.shape={xp.shape}, w.shape={w.shape} do not fit the layout of "
                         f"{layout.padded_source.shape[0]} padded rows and {layout.n_groups} groups")
    _check_kernel_backend(backend, xp.dtype, layout.tile_m, blocks, interpret)
    rows_tile = getattr(blocks, "cta_m", None) or getattr(blocks, "block_m", None)
    if blocks is not None and rows_tile != layout.tile_m:
        raise ValueError(f"the blocks' row tile {rows_tile} (block_m or cta_m) must equal the "
                         f"layout's tile_m={layout.tile_m}")
    operands = _vary_alike(xp, w, layout.tile_group, layout.group_first_tile, layout.group_tiles)
    return _kernel_matmul(*operands, _Static(backend, out_dtype, blocks, interpret))


def grouped_matmul(x, w, group_sizes, *, out_dtype=None, backend="auto", interpret=False,
                   blocks=None):
    """Y[i] = X[i] @ W[g] for the rows i of group g, fp32 accumulation (as `lax.ragged_dot`).

    Args:
      x: [m, K], rows sorted by group; w: [G, K, N], x's dtype (float32, bfloat16, float16).
      group_sizes: [G] int, rows per group; rows past sum(group_sizes) give 0.
      out_dtype: Y's dtype (default x.dtype).
      backend: "auto" (Triton on a GPU or with interpret=True, else the reference with one
        warning), "triton", "mosaic" (Hopper, 16-bit), "xla" (`lax.ragged_dot`), "reference".
        A named backend that cannot serve the call raises.
      interpret: run the Pallas kernels in interpret mode (CPU tests).
      blocks: TritonBlocks or MosaicTiles of the rows kernel; its block_m (cta_m) is the row
        tile of the padded layout.
    Returns:
      [m, N] in out_dtype, differentiable in x and w (the backward runs the same backend).
    Raises:
      ValueError: bad ranks, shapes, dtypes, options, or a backend that cannot run here.
    """
    _check_operands(x, w, "grouped_matmul")
    if getattr(group_sizes, "shape", None) != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an int array of shape ({w.shape[0]},) (one per group "
                         f"of w); got {getattr(group_sizes, 'dtype', None)} {getattr(group_sizes, 'shape', None)}")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    _check_options(out_dtype, interpret, blocks)
    _api.check_backend(backend, BACKENDS)
    if backend == "xla":
        return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=out_dtype)
    if backend == "auto" and _api.platform() == "gpu" and not interpret:
        backend = auto_backend(x.dtype)
    if backend in ("auto", "triton"):
        backend = _api.triton_or_reference(backend, interpret, functools.partial(
            _api.warn_once, _log, _warned))
    if backend == "reference":
        return reference.grouped_matmul_reference(x, w, group_sizes).astype(out_dtype)
    tile_m = config.default_tile_m(x.shape[0], x.dtype, backend)
    if blocks is not None:
        tile_m = blocks.cta_m if isinstance(blocks, MosaicTiles) else blocks.block_m
    layout = layout_from_sizes(group_sizes, x.shape[0], tile_m)
    yp = padded_grouped_matmul(pad_rows(x, layout), w, layout, out_dtype=out_dtype, backend=backend,
                               interpret=interpret, blocks=blocks)
    return unpad_rows(yp, layout)
