"""The definition of correct: a loop over groups in fp32 plain jnp."""
import jax.numpy as jnp


def row_groups(group_sizes, m: int):
    """[m] int32 group of each row of a group-sorted array (G for rows past sum(group_sizes))."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right").astype(jnp.int32)


def grouped_matmul_reference(x, w, group_sizes):
    """Y[i] = X[i] @ W[group of row i], fp32: x [m, K] sorted by group, w [G, K, N],
    group_sizes [G] (the `lax.ragged_dot` convention: rows past the last group give 0)."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    groups = row_groups(group_sizes, x.shape[0])
    y = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    for g in range(w.shape[0]):
        y = y + jnp.where((groups == g)[:, None], jnp.matmul(x, w[g], precision="highest"), 0.0)
    return y
