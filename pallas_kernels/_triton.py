"""Pieces the Pallas Triton kernels share: fp32 dot precision and the row repeat that lets a
few rows (a decode step's) fill the 16 rows a Triton dot needs."""
import jax.numpy as jnp
from jax import lax

MIN_DOT_ROWS = 16  # Triton dots: M, N, K >= 16


def dot_precision(dtype):
    """Triton turns fp32 dots into TF32 by default; ask for IEEE fp32 so fp32 stays fp32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def row_copies(rows: int) -> int:
    """How many copies of `rows` rows (a power of 2) fill a dot's 16 rows (1 from 16 on)."""
    return max(1, MIN_DOT_ROWS // rows)


def repeat_rows(x, copies: int):
    """x [rows, ...] stacked `copies` times -> [copies * rows, ...] (copy c is rows c*rows..)."""
    if copies == 1:
        return x
    return lax.broadcast_in_dim(x, (copies, *x.shape), tuple(range(1, x.ndim + 1))).reshape(
        copies * x.shape[0], *x.shape[1:])


def one_copy(x, copies: int):
    """The first rows of x [copies * rows, ...] computed from `repeat_rows` input: each row's
    arithmetic is its own, so the copies are bitwise equal and their max is any one of them
    (Triton has no slicing of a register tile)."""
    if copies == 1:
        return x
    return x.reshape(copies, x.shape[0] // copies, *x.shape[1:]).max(axis=0)
