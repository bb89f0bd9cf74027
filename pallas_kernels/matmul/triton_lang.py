"""Matmul written in Triton itself (the Triton tutorial's blocked kernel), called through
jax_triton.triton_call. Needs the optional extra `triton` (jax-triton 0.3.1) and a CUDA GPU.

Same tiling as triton_matmul.py (grouped program order, K loop, fp32 accumulator, one store),
but with explicit pointers and masks, so M, N, K need not be block multiples. fp8 inputs take
one fp32 scale (16-bit ones 1.0), applied to the accumulator. fp32 inputs multiply in IEEE fp32
(Triton's default for them is TF32, ~1e-3 relative error). Forward only: triton_call has no
autodiff rule.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.matmul.config import TritonBlocks


@functools.cache
def _kernel():
    """The @triton.jit kernel, built on first use so that importing this module needs no triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def matmul_kernel(a_ptr, b_ptr, scale_ptr, c_ptr, M, N, K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, IEEE: tl.constexpr):
        # Grouped order: consecutive programs cover GROUP_M tile rows, column by column.
        program = tl.program_id(0)
        m_tiles = tl.cdiv(M, BLOCK_M)
        n_tiles = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * n_tiles
        first_row = (program // per_group) * GROUP_M
        rows_in_group = min(m_tiles - first_row, GROUP_M)
        tile_m = first_row + (program % per_group) % rows_in_group
        tile_n = (program % per_group) // rows_in_group

        rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        ks = tl.arange(0, BLOCK_K)
        # Row-major A [M, K] and B [K, N]; out-of-range rows/cols read row/col 0 (never stored).
        a_ptrs = a_ptr + (rows % M)[:, None].to(tl.int64) * K + ks[None, :]
        b_ptrs = b_ptr + ks[:, None].to(tl.int64) * N + (cols % N)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - step * BLOCK_K
            a = tl.load(a_ptrs, mask=ks[None, :] < k_left, other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(b_ptrs, mask=ks[:, None] < k_left, other=0.0)  # [BLOCK_K, BLOCK_N]
            if IEEE:  # fp32 inputs: Triton's default for them is TF32
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * N
        acc = acc * tl.load(scale_ptr)  # 1.0 for 16-bit inputs
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))

    return matmul_kernel


def matmul(a, b, scale, *, out_dtype, blocks: TritonBlocks):
    """C = A @ B (times scale[0], an fp32 [1] array) in out_dtype; a [M, K], b [K, N] row-major."""
    import jax_triton

    (m, k), n = a.shape, b.shape[1]
    tiles = -(-m // blocks.block_m) * -(-n // blocks.block_n)
    return jax_triton.triton_call(
        a, b, scale,
        kernel=_kernel(),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(tiles,),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        M=m, N=n, K=k, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        GROUP_M=blocks.group_m, IEEE=a.dtype == jnp.float32,
    )
