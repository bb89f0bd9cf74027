"""Public RMSNorm / LayerNorm functions (plain and residual-fused) with Pallas forward and backward.

Each call validates its inputs, picks a backend ("triton": the Pallas kernels in triton_fwd.py and
triton_bwd.py; "reference": reference.py under JAX autodiff), flattens the leading axes into rows and
calls one jax.custom_vjp function whose options travel as a frozen dataclass.
"""
import dataclasses
import functools
import logging
import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.norms import config as norm_config
from pallas_kernels.norms import reference, triton_bwd, triton_fwd

_LOG = logging.getLogger(__name__)
_WARNED: set[str] = set()
BACKENDS = ("auto", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class _Options:
    subtract_mean: bool
    eps: float
    config: norm_config.NormConfig
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _triton_norm(x, residual, weight, bias, opts):
    """x, residual?: [rows, hidden]; weight, bias?: [hidden]. Returns (y, x + residual or None)."""
    y, new_residual, _, _ = triton_fwd.norm_forward(
        x, residual, weight, bias, subtract_mean=opts.subtract_mean, eps=opts.eps,
        config=opts.config, interpret=opts.interpret)
    return y, new_residual


def _triton_norm_fwd(x, residual, weight, bias, opts):
    y, new_residual, mean, rstd = triton_fwd.norm_forward(
        x, residual, weight, bias, subtract_mean=opts.subtract_mean, eps=opts.eps,
        config=opts.config, interpret=opts.interpret)
    normalized_input = x if residual is None else new_residual
    return (y, new_residual), (normalized_input, weight, bias, mean, rstd)


def _triton_norm_bwd(opts, res, cotangents):
    s, weight, bias, mean, rstd = res
    dy, dsum = cotangents  # dsum is None when the residual add was not fused
    ds, dweight, dbias = triton_bwd.norm_backward(
        s, dy, dsum, weight, mean, rstd, has_bias=bias is not None, config=opts.config,
        interpret=opts.interpret)
    dresidual = ds if dsum is not None else None
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return ds, dresidual, dweight.astype(weight.dtype), dbias


_triton_norm.defvjp(_triton_norm_fwd, _triton_norm_bwd)


def _warn_once(reason: str) -> None:
    _api.warn_once(_LOG, _WARNED, f"norms: using the reference implementation: {reason}")


def _validate(x, residual, weight, bias, eps, backend, config):
    _api.check_float_dtype("x", x)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x shape={x.shape} needs a non-empty last (hidden) axis")
    hidden = x.shape[-1]
    for name, vector in (("weight", weight), ("bias", bias)):
        if vector is None:
            continue
        if vector.shape != (hidden,):
            raise ValueError(
                f"{name} shape={vector.shape} must be (hidden,)=({hidden},) to match x shape={x.shape}")
        if not jnp.issubdtype(vector.dtype, jnp.floating):
            raise ValueError(f"{name} dtype={jnp.dtype(vector.dtype).name} must be floating point")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual shape={residual.shape} dtype={jnp.dtype(residual.dtype).name} must equal "
            f"x shape={x.shape} dtype={jnp.dtype(x.dtype).name}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps={eps} must be a finite Python number > 0")
    _api.check_backend(backend, BACKENDS)
    if config is not None and not isinstance(config, norm_config.NormConfig):
        raise ValueError(f"config={config!r} must be a NormConfig or None")


def _choose_backend(backend, hidden, interpret):
    """Resolve "auto"; an explicitly named backend that cannot serve the call raises."""
    if _api.triton_or_reference(backend, interpret, _warn_once) == "reference":
        return "reference"
    try:
        norm_config.check_supported(hidden)
    except NotImplementedError as e:
        if backend == "triton":
            raise
        _warn_once(str(e))
        return "reference"
    return "triton"


def _reference(x, residual, weight, bias, *, subtract_mean, eps):
    """reference.py under JAX autodiff; returns (y, x + residual or None)."""
    if residual is None:
        if subtract_mean:
            return reference.layer_norm(x, weight, bias, eps=eps), None
        return reference.rms_norm(x, weight, eps=eps), None
    if subtract_mean:
        return reference.layer_norm_residual(x, residual, weight, bias, eps=eps)
    return reference.rms_norm_residual(x, residual, weight, eps=eps)


def _norm(x, residual, weight, bias, *, subtract_mean, eps, backend, interpret, config):
    """Shared body of the four public functions; returns (y, x + residual or None)."""
    _validate(x, residual, weight, bias, eps, backend, config)
    hidden = x.shape[-1]
    chosen = _choose_backend(backend, hidden, interpret)
    if chosen == "reference" or x.size == 0:
        return _reference(x, residual, weight, bias, subtract_mean=subtract_mean, eps=eps)
    rows = math.prod(x.shape[:-1])
    if config is None:
        fn = ("layer_norm" if subtract_mean else "rms_norm") + ("_residual" if residual is not None else "")
        config = norm_config.tuned_config(fn, rows, hidden, x.dtype, interpret=interpret)
    opts = _Options(subtract_mean=subtract_mean, eps=float(eps), config=config, interpret=interpret)
    flat = lambda a: None if a is None else a.reshape(rows, hidden)  # noqa: E731
    y, new_residual = _triton_norm(flat(x), flat(residual), weight, bias, opts)
    return y.reshape(x.shape), None if new_residual is None else new_residual.reshape(x.shape)


def rms_norm(x, weight, *, eps=1e-6, backend="auto", interpret=False, config=None):
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

    Args:
      x: [..., hidden], float32/bfloat16/float16; any leading shape (flattened into rows).
      weight: [hidden], any float dtype.
      eps: > 0, added to the mean square.
      backend: "auto" (Triton kernels on GPU or with interpret=True, else the reference; falls back
        to the reference, with one warning, where hidden > 16384), "triton", or "reference".
      interpret: run the Pallas kernels in interpret mode (CPU).
      config: a NormConfig overriding the block-size heuristic (tuning).
    Returns:
      [..., hidden] in x.dtype.
    Raises:
      ValueError: bad dtype, weight shape not (hidden,), eps <= 0, unknown backend, or "triton"
        without a GPU or interpret=True.
      NotImplementedError: backend="triton" with hidden > 16384.
    """
    return _norm(x, None, weight, None, subtract_mean=False, eps=eps, backend=backend,
                 interpret=interpret, config=config)[0]


def layer_norm(x, weight, bias, *, eps=1e-5, backend="auto", interpret=False, config=None):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * weight + bias, fp32 statistics.

    Args:
      x: [..., hidden], float32/bfloat16/float16. weight: [hidden]. bias: [hidden] or None.
      eps, backend, interpret, config: as in rms_norm.
    Returns:
      [..., hidden] in x.dtype.
    Raises:
      ValueError / NotImplementedError: as in rms_norm (also for a bias shape not (hidden,)).
    """
    return _norm(x, None, weight, bias, subtract_mean=True, eps=eps, backend=backend,
                 interpret=interpret, config=config)[0]


def rms_norm_residual(x, residual, weight, *, eps=1e-6, backend="auto", interpret=False, config=None):
    """Fused residual add + RMSNorm: s = x + residual (in fp32), returns (rms_norm(s), s).

    Args:
      x, residual: [..., hidden], same shape and dtype (float32/bfloat16/float16).
      weight, eps, backend, interpret, config: as in rms_norm.
    Returns:
      (normed [..., hidden], new_residual [..., hidden]), both in x.dtype. normed is computed from the
      fp32 sum, new_residual is that sum rounded to x.dtype.
    Raises:
      ValueError / NotImplementedError: as in rms_norm (also for a residual of another shape/dtype).
    """
    return _norm(x, residual, weight, None, subtract_mean=False, eps=eps, backend=backend,
                 interpret=interpret, config=config)


def layer_norm_residual(x, residual, weight, bias, *, eps=1e-5, backend="auto", interpret=False,
                        config=None):
    """Fused residual add + LayerNorm: s = x + residual (in fp32), returns (layer_norm(s), s).

    Args and Raises as in rms_norm_residual, plus bias: [hidden] or None.
    Returns:
      (normed [..., hidden], new_residual [..., hidden]), both in x.dtype.
    """
    return _norm(x, residual, weight, bias, subtract_mean=True, eps=eps, backend=backend,
                 interpret=interpret, config=config)
