"""matmul and scaled_matmul (fp8): input checks, backend choice, padding, the custom_vjp.

C[M, N] = A[M, K] @ B[K, N], fp32 accumulation. Backends: "triton" (Pallas, Triton lowering;
CPU: interpret mode), "mosaic" (Pallas Mosaic GPU, Hopper, 16-bit), "jax_triton" (a Triton-language
kernel through jax_triton), "reference" (jnp in fp32).
"""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.matmul import config, mosaic_matmul, reference, triton_lang, triton_matmul
from pallas_kernels.triton import unavailable_reason as jax_triton_unavailable_reason

BACKENDS = ("auto", "reference", "triton", "mosaic", "jax_triton")
FP8 = jnp.dtype(jnp.float8_e4m3fn)
OUT_DTYPES = _api.FLOAT_DTYPES

_log = logging.getLogger(__name__)
_warned: set[str] = set()


_is_hopper = _api.targets_hopper


def _supports_fp8() -> bool:
    """Triton's fp8 dot needs compute capability >= 8.9 (Ada, Hopper and later): the local GPU's;
    lowering for a GPU from a host without one, whether the abstract mesh's GPU is a Hopper."""
    if jax.default_backend() != "gpu":
        return _api.targets_hopper()
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and tuple(map(int, capability.split("."))) >= (8, 9)


def _check_operands(a, b, dtypes, what):
    for name, x in (("a", a), ("b", b)):
        if getattr(x, "ndim", None) != 2:
            raise ValueError(f"{name} must be rank 2; got {name}.shape={getattr(x, 'shape', None)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a.shape={a.shape} and b.shape={b.shape}: a's columns must equal b's rows")
    if min(a.shape + b.shape) < 1:
        raise ValueError(f"empty dimension: a.shape={a.shape}, b.shape={b.shape}")
    if a.dtype != b.dtype or jnp.dtype(a.dtype) not in dtypes:
        raise ValueError(f"{what} needs a and b of one dtype from {[d.name for d in dtypes]}; got "
                         f"a.dtype={jnp.dtype(a.dtype).name}, b.dtype={jnp.dtype(b.dtype).name}")


def _choose_backend(backend, dtype, interpret):
    """Resolve "auto"; a named backend that cannot serve the call raises ValueError."""
    _api.check_backend(backend, BACKENDS)
    fp8 = jnp.dtype(dtype) == FP8
    if backend == "auto":
        # TODO(#14): "mosaic" on Hopper for 16-bit inputs once bench.py shows it ahead of "triton".
        backend = _api.triton_or_reference("auto", interpret, functools.partial(
            _api.warn_once, _log, _warned))
    if backend == "reference":
        return backend
    if backend == "jax_triton":
        reason = jax_triton_unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='jax_triton' cannot run here: {reason}")
    elif backend == "triton":
        _api.triton_or_reference("triton", interpret, None)
    elif backend == "mosaic":
        if fp8 or jnp.dtype(dtype) not in mosaic_matmul.DTYPES:
            raise ValueError(f"dtype={jnp.dtype(dtype).name} unsupported by backend='mosaic'; use "
                             "bfloat16 or float16, or backend='triton'")
        if not interpret and not _is_hopper():
            raise ValueError(f"backend='mosaic' needs an sm_90 GPU (Hopper) or interpret=True; got "
                             f"{jax.devices()[0].device_kind!r}")
    if fp8 and not interpret and not _supports_fp8():
        abstract = jax.sharding.get_abstract_mesh().abstract_device
        raise ValueError(f"float8_e4m3fn matmuls need compute capability >= 8.9; got "
                         f"{(abstract or jax.devices()[0]).device_kind!r}")
    return backend


@dataclasses.dataclass(frozen=True)
class _Static:
    """Non-differentiable options of one kernel call (hashable, for custom_vjp)."""
    backend: str  # "triton", "mosaic" or "jax_triton"
    out_dtype: jnp.dtype
    blocks: object  # config.TritonBlocks or config.MosaicTiles; None: table, then heuristic
    interpret: bool


def _pad_to(x, rows, cols):
    """Zero-pad a 2-D array up to multiples of (rows, cols): zeros add nothing to a product."""
    pad = (-x.shape[0] % rows, -x.shape[1] % cols)
    return jnp.pad(x, ((0, pad[0]), (0, pad[1]))) if any(pad) else x


def _run(a, b, scale, static: _Static):
    """The kernel call: a [M, K] @ b [K, N] (* scale [1] fp32) in static.out_dtype."""
    (m, k), n = a.shape, b.shape[1]
    if static.backend == "mosaic":
        tiles = static.blocks or config.mosaic_tiles(m, n, k, a.dtype)
        c = mosaic_matmul.matmul(_pad_to(a, tiles.cta_m, tiles.tile_k),
                                 _pad_to(b, tiles.tile_k, tiles.cta_n), out_dtype=static.out_dtype,
                                 tiles=tiles, interpret=static.interpret)
        return c[:m, :n]
    kernel = "matmul_jax_triton" if static.backend == "jax_triton" else "matmul_triton"
    blocks = static.blocks or config.triton_blocks(m, n, k, a.dtype, kernel)
    if static.backend == "jax_triton":
        scale = jnp.ones((1,), jnp.float32) if scale is None else scale
        return triton_lang.matmul(a, b, scale, out_dtype=static.out_dtype, blocks=blocks)
    c = triton_matmul.matmul(_pad_to(a, blocks.block_m, blocks.block_k),
                             _pad_to(b, blocks.block_k, blocks.block_n), scale,
                             out_dtype=static.out_dtype, blocks=blocks, interpret=static.interpret)
    return c[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_matmul(a, b, static: _Static):
    return _run(a, b, None, static)


def _kernel_matmul_fwd(a, b, static):
    return _run(a, b, None, static), (a, b)


def _kernel_matmul_bwd(static, residuals, dc):
    """dA = dC B^T, dB = A^T dC, by the same kernel (XLA transposes the operands)."""
    a, b = residuals
    dc = dc.astype(a.dtype)
    da = _run(dc, b.T, None, dataclasses.replace(static, out_dtype=a.dtype, blocks=None))
    db = _run(a.T, dc, None, dataclasses.replace(static, out_dtype=b.dtype, blocks=None))
    return da, db


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def _check_options(out_dtype, interpret, blocks):
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype).name} unsupported; use one of "
                         f"{[d.name for d in OUT_DTYPES]}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret={interpret!r} must be a bool")
    if blocks is not None and not isinstance(blocks, (config.TritonBlocks, config.MosaicTiles)):
        raise ValueError(f"blocks={blocks!r} must be a config.TritonBlocks, config.MosaicTiles or None")


def _check_blocks(backend, blocks):
    wanted = config.MosaicTiles if backend == "mosaic" else config.TritonBlocks
    if blocks is not None and not isinstance(blocks, wanted):
        raise ValueError(f"backend={backend!r} takes blocks of type {wanted.__name__}; "
                         f"got {type(blocks).__name__}")


def matmul(a, b, *, out_dtype=None, backend="auto", interpret=False, blocks=None):
    """C = A @ B with fp32 accumulation.

    Args:
      a: [M, K]; b: [K, N]; one dtype: float32, bfloat16 or float16 (mosaic: 16-bit only).
      out_dtype: C's dtype (default a.dtype).
      backend: "auto" (Pallas Triton on a GPU, or on CPU with interpret=True; otherwise the
        reference, with one warning), "triton", "mosaic" (Hopper), "jax_triton" (needs jax_triton
        and a GPU), "reference". A named backend that cannot serve the call raises.
      interpret: run the Pallas kernels in interpret mode (CPU tests; for "mosaic" inside an
        abstract GPU mesh, see test_matmul.py).
      blocks: config.TritonBlocks (triton, jax_triton) or config.MosaicTiles (mosaic); default:
        the autotune table's entry for this GPU and shape, else the heuristic.
    Returns:
      [M, N] in out_dtype; differentiable in a and b (the backward runs the same backend).
    Raises:
      ValueError: bad rank, shapes, dtypes, options, or a named backend that cannot run here.
    """
    _check_operands(a, b, _api.FLOAT_DTYPES, "matmul")
    out_dtype = jnp.dtype(a.dtype if out_dtype is None else out_dtype)
    _check_options(out_dtype, interpret, blocks)
    chosen = _choose_backend(backend, a.dtype, interpret)
    _check_blocks(chosen, blocks)
    if chosen == "reference":
        return reference.matmul_reference(a, b).astype(out_dtype)
    return _kernel_matmul(a, b, _Static(chosen, out_dtype, blocks, interpret))


def scaled_matmul(a, b, a_scale, b_scale, *, out_dtype=jnp.bfloat16, backend="auto",
                  interpret=False, blocks=None):
    """C = (A * a_scale) @ (B * b_scale) for fp8 e4m3 A and B with per-tensor fp32 scales.

    Args:
      a: [M, K], b: [K, N], both float8_e4m3fn (values already divided by their scales).
      a_scale, b_scale: scalars (Python floats or 0-d/size-1 arrays), multiplied into the fp32
        accumulator once.
      out_dtype, interpret, blocks: as in matmul. backend: "auto", "triton", "jax_triton" or
        "reference" (mosaic has no fp8 path yet: raises).
    Returns:
      [M, N] in out_dtype. Forward only (no gradient rule).
    Raises:
      ValueError: as in matmul; a GPU below compute capability 8.9 for a kernel backend.
    """
    _check_operands(a, b, (FP8,), "scaled_matmul")
    out_dtype = jnp.dtype(out_dtype)
    _check_options(out_dtype, interpret, blocks)
    for name, s in (("a_scale", a_scale), ("b_scale", b_scale)):
        if jnp.size(s) != 1:
            raise ValueError(f"{name} must be a scalar (per-tensor scale); got shape {jnp.shape(s)}")
    chosen = _choose_backend(backend, a.dtype, interpret)
    _check_blocks(chosen, blocks)
    scale = (jnp.asarray(a_scale, jnp.float32) * jnp.asarray(b_scale, jnp.float32)).reshape(1)
    if chosen == "reference":
        return (reference.matmul_reference(a, b) * scale[0]).astype(out_dtype)
    return _run(a, b, scale, _Static(chosen, out_dtype, blocks, interpret))
