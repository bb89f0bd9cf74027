"""Block sizes for the softmax kernels: a frozen config and its heuristic (no tuning table yet)."""
import dataclasses

from jax.experimental import pallas as pl

from pallas_kernels import _api

# Rows up to this many columns are held whole in registers (one read of x); longer rows (vocabularies)
# take the online path: one pass for the running max and sum, a second to write (Milakov & Gimelshein 2018).
MAX_SINGLE_TILE_COLS = 16384
ONLINE_BLOCK_COLS = 4096
_TARGET_BLOCK_ELEMENTS = 4096
_ELEMENTS_PER_THREAD = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoftmaxConfig:
    """block_rows, block_cols: tile of one program (powers of 2); the row is walked in block_cols
    chunks, so block_cols < n_cols selects the online path. num_warps: warps per program (<= 32)."""
    block_rows: int
    block_cols: int
    num_warps: int

    def __post_init__(self):
        _api.check_launch_config(self, powers_of_2=("block_rows", "block_cols", "num_warps"),
                                 warps=("num_warps",))


def default_config(n_rows: int, n_cols: int) -> SoftmaxConfig:
    """Heuristic config for [n_rows, n_cols] rows."""
    width = pl.next_power_of_2(n_cols)
    block_cols = width if width <= MAX_SINGLE_TILE_COLS else ONLINE_BLOCK_COLS
    block_rows = max(1, _TARGET_BLOCK_ELEMENTS // block_cols)
    block_rows = min(block_rows, pl.next_power_of_2(n_rows))
    num_warps = min(16, max(1, block_rows * block_cols // (32 * _ELEMENTS_PER_THREAD)))
    return SoftmaxConfig(block_rows=block_rows, block_cols=block_cols, num_warps=num_warps)
