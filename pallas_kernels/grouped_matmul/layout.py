"""The padded row layout of a grouped matmul (MegaBlocks, Gale et al. 2022, section 5.1).

Rows are placed group by group, each group padded up to a multiple of the row tile `tile_m`, so
every row tile belongs to one group and a grouped matmul is a plain tiled matmul whose weight
tile is picked per row tile. The padded row count has the static bound
m + G * (tile_m - 1), rounded up to tile_m; tiles past the last group ("spare" tiles) carry the
group id G. Moving rows in and out of the layout is one gather each way (`pad_rows`,
`unpad_rows`), and each is the other's transpose, so gradients stay gathers too.

m rows, G groups, P padded rows, T = P // tile_m row tiles.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupLayout(NamedTuple):
    """Index arrays of one padded layout (a pytree: it can cross jit and custom_vjp).

    row_position: [m] int32, each row's place in the padded layout (P for rows in no group).
    padded_source: [P] int32, the row each padded slot holds (m for padding slots).
    tile_group: [T] int32, the group of each row tile (G for spare tiles).
    group_first_tile: [G] int32, the first row tile of each group.
    group_tiles: [G] int32, how many row tiles each group spans (0 for an empty group).
    """
    row_position: jax.Array
    padded_source: jax.Array
    tile_group: jax.Array
    group_first_tile: jax.Array
    group_tiles: jax.Array

    @property
    def tile_m(self) -> int:
        return self.padded_source.shape[0] // self.tile_group.shape[0]

    @property
    def n_groups(self) -> int:
        return self.group_tiles.shape[0]

    def padded_row_group(self):
        """[P] int32: the group of each padded row (G for spare rows)."""
        return jnp.repeat(self.tile_group, self.tile_m, total_repeat_length=self.padded_source.shape[0])


def padded_rows(m: int, n_groups: int, tile_m: int) -> int:
    """Static bound on the padded row count: each group wastes under one tile, rounded to tiles."""
    bound = m + n_groups * (tile_m - 1)
    return -(-bound // tile_m) * tile_m


@functools.partial(jax.jit, static_argnames=("n_groups", "tile_m"))
def make_layout(row_group, n_groups: int, tile_m: int) -> GroupLayout:
    """The padded layout of rows with group ids row_group [m] int (values in [0, G]; G: no group).

    Rows of a group keep their relative order. Runs in jnp on the device (a stable argsort and
    a few small scatters), once per call; the layout serves every matmul over the same rows.
    """
    m = row_group.shape[0]
    p = padded_rows(m, n_groups, tile_m)
    row_group = row_group.astype(jnp.int32)
    sizes = jnp.bincount(row_group, length=n_groups).astype(jnp.int32)  # id G falls outside
    group_tiles = -(-sizes // tile_m)
    group_first_tile = jnp.cumsum(group_tiles) - group_tiles
    starts = jnp.cumsum(sizes) - sizes  # where each group starts among the sorted rows
    order = jnp.argsort(row_group, stable=True)
    sorted_group = row_group[order]
    rank = jnp.arange(m, dtype=jnp.int32) - jnp.take(starts, sorted_group, mode="fill", fill_value=0)
    position = jnp.where(sorted_group < n_groups,
                         jnp.take(group_first_tile, sorted_group, mode="fill", fill_value=0) * tile_m + rank,
                         p)  # [m] in sorted order; P: not placed
    row_position = jnp.zeros((m,), jnp.int32).at[order].set(position, unique_indices=True)
    padded_source = jnp.full((p,), m, jnp.int32).at[position].set(order.astype(jnp.int32), mode="drop")
    tile_ends = jnp.cumsum(group_tiles)  # [G]
    tile_group = jnp.searchsorted(tile_ends, jnp.arange(p // tile_m, dtype=jnp.int32),
                                  side="right").astype(jnp.int32)  # G past the last group
    return GroupLayout(row_position, padded_source, tile_group, group_first_tile.astype(jnp.int32),
                       group_tiles.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("m", "tile_m"))
def layout_from_sizes(group_sizes, m: int, tile_m: int) -> GroupLayout:
    """The layout of m rows sorted by group, group g holding group_sizes[g] rows (the
    `lax.ragged_dot` convention; rows past sum(group_sizes) belong to no group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    row_group = jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")
    return make_layout(row_group, group_sizes.shape[0], tile_m)


def _gather_rows(x, index):
    """out[i] = x[index[i]], zero where index[i] is out of range."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def _move_rows(x, index, inverse):
    return _gather_rows(x, index)


def _move_rows_fwd(x, index, inverse):
    return _gather_rows(x, index), (index, inverse)


def _move_rows_bwd(residuals, dy):
    """The transpose of a gather through a partial permutation is the gather through its
    inverse (rows nothing reads get 0), not a scatter-add."""
    index, inverse = residuals
    return _gather_rows(dy, inverse), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def pad_rows(x, layout: GroupLayout):
    """x [m, K] -> [P, K] in the padded layout; padding slots and spare tiles are 0."""
    return _move_rows(x, layout.padded_source, layout.row_position)


def unpad_rows(y, layout: GroupLayout):
    """y [P, N] -> [m, N] back in the original row order; rows in no group get 0."""
    return _move_rows(y, layout.row_position, layout.padded_source)
