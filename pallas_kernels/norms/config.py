"""Block sizes for the norm kernels: a frozen config and the heuristic that picks it.

No tuning table yet: the numbers below are the Triton layer-norm tutorial's rule of thumb
(about 16 elements per thread, at most 16 warps), to be replaced by H100 measurements.
"""
import dataclasses

import jax
from jax.experimental import pallas as pl

from pallas_kernels import _api
from pallas_kernels.autotune import table as autotune_table

# One program holds a whole row (next power of two of hidden) in registers; beyond this the
# Triton backend does not serve the call (api.py falls back to the reference under backend="auto").
MAX_BLOCK_HIDDEN = 16384
# Row tiles aim at this many elements per program (8 KiB of bf16).
_TARGET_BLOCK_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 16
_DEFAULT_SM_COUNT = 132  # H100 SXM; used when the device does not report core_count


@dataclasses.dataclass(frozen=True, kw_only=True)
class NormConfig:
    """Launch parameters of the forward and backward norm kernels.

    block_rows: rows per program (power of 2), forward and backward.
    num_warps, bwd_num_warps: warps per program, forward and backward (powers of 2, <= 32).
    bwd_programs: programs of the persistent backward; each loops over row tiles p, p + P, ...
      and writes one row of the [bwd_programs, hidden] dweight/dbias partial sums.
    """
    block_rows: int
    num_warps: int
    bwd_num_warps: int
    bwd_programs: int

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("block_rows", "num_warps", "bwd_num_warps"),
                                 warps=("num_warps", "bwd_num_warps"))
        if self.bwd_programs < 1:
            raise ValueError(f"NormConfig.bwd_programs={self.bwd_programs} must be >= 1")


def sm_count() -> int:
    """Streaming multiprocessors of the first device (_DEFAULT_SM_COUNT where it reports none)."""
    return getattr(jax.devices()[0], "core_count", None) or _DEFAULT_SM_COUNT


def block_hidden(hidden: int) -> int:
    """Columns a program loads: hidden rounded up to a power of 2 (Triton tiles are powers of 2)."""
    return pl.next_power_of_2(hidden)


def check_supported(hidden: int) -> None:
    """Raise NotImplementedError when one row does not fit one Triton tile."""
    if block_hidden(hidden) > MAX_BLOCK_HIDDEN:
        raise NotImplementedError(
            f"hidden={hidden} needs a {block_hidden(hidden)}-wide tile; the Triton norm kernels hold "
            f"one row per tile and support hidden <= {MAX_BLOCK_HIDDEN}")


def default_config(n_rows: int, hidden: int, *, interpret: bool) -> NormConfig:
    """Heuristic config for an [n_rows, hidden] input (hidden already checked)."""
    width = block_hidden(hidden)
    block_rows = max(1, _TARGET_BLOCK_ELEMENTS // width)
    block_rows = min(block_rows, pl.next_power_of_2(n_rows))
    num_warps = min(16, max(1, block_rows * width // (32 * _ELEMENTS_PER_THREAD)))
    n_tiles = pl.cdiv(n_rows, block_rows)
    if interpret:
        programs = 4  # interpret mode runs programs one after another; keep the grid short
    else:
        programs = 4 * sm_count()
    return NormConfig(block_rows=block_rows, num_warps=num_warps, bwd_num_warps=num_warps,
                      bwd_programs=max(1, min(programs, n_tiles)))


def tuned_config(fn: str, n_rows: int, hidden: int, dtype, *, interpret: bool) -> NormConfig:
    """default_config with the autotune table's entry for this GPU and shape applied
    (interpret mode: the heuristic)."""
    default = default_config(n_rows, hidden, interpret=interpret)
    if interpret:
        return default
    return autotune_table.best_config("norms", autotune_table.norms_key(fn, n_rows, hidden, dtype), default)
