"""Public softmax: validation, backend choice, and a jax.custom_vjp over the Pallas kernels."""
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _api
from pallas_kernels.softmax import config as softmax_config
from pallas_kernels.softmax import reference, triton_bwd, triton_fwd

_LOG = logging.getLogger(__name__)
_WARNED: set[str] = set()
BACKENDS = ("auto", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class _Options:
    config: softmax_config.SoftmaxConfig
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _triton_softmax(x, opts):
    """x: [rows, n_cols]. Softmax over the last axis."""
    return triton_fwd.softmax_forward(x, config=opts.config, interpret=opts.interpret)


def _triton_softmax_fwd(x, opts):
    y = triton_fwd.softmax_forward(x, config=opts.config, interpret=opts.interpret)
    return y, y  # the backward needs only the output


def _triton_softmax_bwd(opts, y, dy):
    return (triton_bwd.softmax_backward(y, dy, config=opts.config, interpret=opts.interpret),)


_triton_softmax.defvjp(_triton_softmax_fwd, _triton_softmax_bwd)


def _validate(x, axis, backend, config):
    _api.check_float_dtype("x", x)
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} out of range for x shape={x.shape}")
    if x.shape[axis] == 0:
        raise ValueError(f"x shape={x.shape} has an empty softmax axis {axis}")
    _api.check_backend(backend, BACKENDS)
    if config is not None and not isinstance(config, softmax_config.SoftmaxConfig):
        raise ValueError(f"config={config!r} must be a SoftmaxConfig or None")


def _warn_once(reason: str) -> None:
    _api.warn_once(_LOG, _WARNED, f"softmax: using the reference implementation: {reason}")


def softmax(x, axis=-1, *, backend="auto", interpret=False, config=None):
    """Softmax along one axis, fp32 math, defined for every row.

    A row whose entries are all -inf gives zeros (and a zero gradient) instead of NaN; large negative
    and -inf entries among finite ones are handled exactly (they get 0). +inf or NaN inputs are not
    supported (the reference gives NaN; the kernel's result is unspecified there).

    Args:
      x: any shape, float32/bfloat16/float16.
      axis: the softmax axis; a non-last axis is moved last (a transpose) and back.
      backend: "auto" (Triton kernels on GPU or with interpret=True, else the reference), "triton"
        or "reference".
      interpret: run the Pallas kernels in interpret mode (CPU).
      config: a SoftmaxConfig overriding the block-size heuristic (block_cols < the axis length
        selects the two-pass online kernel).
    Returns:
      Same shape and dtype as x.
    Raises:
      ValueError: bad dtype, axis out of range or empty, unknown backend, "triton" without a GPU
        or interpret=True.
    """
    _validate(x, axis, backend, config)
    # "auto": Triton on GPU or in interpret mode; a named backend that cannot run raises.
    if _api.triton_or_reference(backend, interpret, _warn_once) == "reference" or x.size == 0:
        return reference.softmax(x, axis=axis)
    moved = jnp.moveaxis(x, axis, -1)
    n_cols = moved.shape[-1]
    rows = math.prod(moved.shape[:-1])
    if config is None:
        config = softmax_config.default_config(rows, n_cols)
    y = _triton_softmax(moved.reshape(rows, n_cols), _Options(config=config, interpret=interpret))
    return jnp.moveaxis(y.reshape(moved.shape), -1, axis)
