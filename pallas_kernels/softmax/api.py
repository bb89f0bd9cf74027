"""Public softmax: validation, backend choice, and a jax.custom_vjp over the Pallas kernels."""
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from pallas_kernels.softmax import config as softmax_config
from pallas_kernels.softmax import reference, triton_bwd, triton_fwd

_LOG = logging.getLogger(__name__)
_WARNED: set[str] = set()
BACKENDS = ("auto", "triton", "reference")
_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


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
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x dtype={jnp.dtype(x.dtype).name} unsupported; use float32, bfloat16 or float16")
    if not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} out of range for x shape={x.shape}")
    if x.shape[axis] == 0:
        raise ValueError(f"x shape={x.shape} has an empty softmax axis {axis}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} unknown; use one of {BACKENDS}")
    if config is not None and not isinstance(config, softmax_config.SoftmaxConfig):
        raise ValueError(f"config={config!r} must be a SoftmaxConfig or None")


def _choose_backend(backend, interpret):
    """Resolve "auto" (Triton on GPU or in interpret mode); a named backend that cannot run raises."""
    on_gpu = interpret or jax.default_backend() == "gpu"
    if backend == "triton" and not on_gpu:
        raise ValueError("backend='triton' needs a GPU; pass interpret=True to run it on CPU")
    if backend == "auto" and not on_gpu:
        reason = f"no GPU (default backend {jax.default_backend()!r}) and interpret=False"
        if reason not in _WARNED:
            _WARNED.add(reason)
            _LOG.warning("softmax: using the reference implementation: %s", reason)
        return "reference"
    return "reference" if backend == "reference" else "triton"


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
    if _choose_backend(backend, interpret) == "reference" or x.size == 0:
        return reference.softmax(x, axis=axis)
    moved = jnp.moveaxis(x, axis, -1)
    n_cols = moved.shape[-1]
    rows = math.prod(moved.shape[:-1])
    if config is None:
        config = softmax_config.default_config(rows, n_cols)
    y = _triton_softmax(moved.reshape(rows, n_cols), _Options(config=config, interpret=interpret))
    return jnp.moveaxis(y.reshape(moved.shape), -1, axis)
