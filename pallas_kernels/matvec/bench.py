"""matvec benchmarks: ours (the fused Triton kernel) vs XLA running the same layer math the way
the model's unfused decode step does (RMSNorm, a GEMM with the one-row pad as llmjax.ops.dense
has it, SwiGLU, the residual add), in one run; rows, no files.

GB/s counts the bytes a fused implementation must move (nominal, the same for every impl): the
weights (+ int8 scales), x, the norm weight, the residual and the output.
"""
import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.matvec import cases, config, matvec, reference
from pallas_kernels.matvec.cases import MatvecCase

IMPLS = ("triton", "xla")
XLA_GEMV_TO_REDUCE_BELOW = 10_000_000  # as llmjax.ops (kernels import nothing from llmjax)


def nominal_bytes(case: MatvecCase, rows: int) -> int:
    weights = (2 if case.gated else 1) * case.n * case.k * (1 if case.int8 else 2)
    scales = (2 if case.gated else 1) * case.n * 2 if case.int8 else 0
    out = rows * case.n * (4 if case.logits else 2)
    return (weights + scales + rows * case.k * 2 + (case.k * 2 if case.norm else 0)
            + (rows * case.n * 2 if case.residual else 0) + out)


def _arg_sets(case: MatvecCase, rows: int, n_sets: int):
    sets = []
    for i in range(n_sets):
        k = jax.random.split(jax.random.key(i), 4)
        shape = (2, case.n, case.k) if case.gated else (case.n, case.k)
        w = jax.random.normal(k[0], shape, jnp.float32) * case.k ** -0.5
        if case.int8:
            w, scale = reference.quantize_rows(w, jnp.bfloat16)
        else:
            w, scale = w.astype(jnp.bfloat16), None
        x = jax.random.normal(k[1], (rows, case.k), jnp.bfloat16)
        norm = (1 + 0.1 * jax.random.normal(k[2], (case.k,))).astype(jnp.bfloat16) if case.norm else None
        residual = jax.random.normal(k[3], (rows, case.n), jnp.bfloat16) if case.residual else None
        sets.append((x, w, scale, norm, residual))
    return sets


def _dense(x, w, scale, out_dtype):
    """x [B, K] times w [N, K]^T the way llmjax.ops.dense runs a decode projection: an int8 w
    converted inside the GEMM and its scales applied to the fp32 result; one row of a small
    product padded to two, so XLA keeps a GEMM instead of rewriting it into reductions."""
    if scale is not None:
        return (_dense(x, w.astype(x.dtype), None, jnp.float32) * scale.astype(jnp.float32)).astype(out_dtype)
    small = x.size + w.size < XLA_GEMV_TO_REDUCE_BELOW
    rows = jnp.concatenate([x, jnp.zeros_like(x)]) if x.shape[0] == 1 and small else x
    y = jnp.matmul(rows, w.T, preferred_element_type=out_dtype)
    return y[:x.shape[0]]


def _xla(case: MatvecCase):
    """The unfused decode step's math for this case, each step its own XLA op as the model has it."""

    def run(x, w, scale, norm, residual):
        if norm is not None:
            x = reference.rms_normalized(x, norm, 1e-5)
        out_dtype = jnp.float32 if case.logits else x.dtype
        if case.gated:
            gate, up = (_dense(x, w[i], None if scale is None else scale[i], out_dtype) for i in (0, 1))
            y = jax.nn.silu(gate) * up
        else:
            y = _dense(x, w, scale, out_dtype)
        return y if residual is None else residual + y
    return run


def _timed_fn(case: MatvecCase, impl: str, blocks):
    if impl == "xla":
        return jax.jit(_xla(case))
    return jax.jit(lambda x, w, scale, norm, residual: matvec(
        x, w, w_scale=scale, norm_weight=norm, residual=residual, gated=case.gated,
        out_dtype=jnp.float32 if case.logits else None, backend="triton", blocks=blocks))


def _row(case, impl, rows, reps, blocks=None, label=None):
    row = dict(op="matvec", case=case.name, impl=label or impl, mode="fwd", rows=rows, k=case.k, n=case.n,
               **_bench.environment())
    if impl == "triton":
        row["config"] = str(blocks or config.default_blocks(case.n, case.k, rows))
    return _bench.add_bandwidth_timing(row, lambda: _timed_fn(case, impl, blocks),
                                       lambda n_sets: _arg_sets(case, rows, n_sets), reps,
                                       nbytes=nominal_bytes(case, rows))


def rows(case_names=None, impls=IMPLS, batch=1, reps=50):
    """One dict per (case, impl) at `batch` rows: time_ms (median of reps), bytes, gbps."""
    return [_row(c, impl, batch, reps) for c in _bench.select(cases.BENCH_CASES, case_names) for impl in impls]


def sweep_rows(case_names=("qkv_norm", "gate_up_norm", "down_residual"), batch=1, reps=20):
    """Block sweep for tuning, labelled triton[block_n,block_k,dot|fma,num_warps,num_stages],
    beside XLA."""
    out = []
    for case in _bench.select(cases.BENCH_CASES, list(case_names)):
        out.append(_row(case, "xla", batch, reps))
        for dot in (True, False):
            for bn in (16, 32) if dot else (4, 8, 16):
                for bk in (256, 512) if dot else (512, 1024, 2048):  # a ragged last K step is masked
                    for warps in (4,) if dot else (1, 2, 4, 8):  # 1 warp a program: no barriers in its sums
                        for stages in (2, 4) if dot else (1, 3):
                            blocks = config.MatvecBlocks(block_n=bn, block_k=bk, dot=dot, num_warps=warps,
                                                         num_stages=stages)
                            out.append(_row(case, "triton", batch, reps, blocks, f"triton[{bn},{bk},"
                                            f"{'dot' if dot else 'fma'},{warps},{stages}]"))
    return out
