"""Grouped matmul benchmark: CASES x IMPLS x {fwd, fwd_bwd} -> rows. No argparse, no files.

`python -m experiments.bench_kernels grouped_matmul` calls `rows()` and writes the results;
`... grouped_matmul --fn tune` times the forward rows kernel over TUNE_TRITON and TUNE_MOSAIC.
Peers in the same run: "xla_dense", one dense matmul [m, K] @ [K, N] of the same FLOPs (the
ceiling a grouped matmul aims at), and "xla_ragged", `jax.lax.ragged_dot`. TFLOP/s counts the
routed FLOPs, 2·m·K·N forward and 3x that forward+backward, for every row.
"""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.grouped_matmul import api, cases
from pallas_kernels.matmul.config import MosaicTiles, TritonBlocks


def _dense(x, w, group_sizes):
    del group_sizes
    return jnp.matmul(x, w[0], preferred_element_type=jnp.float32).astype(x.dtype)


def _ragged(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes)


def _ours(backend, x, w, group_sizes, blocks=None):
    interpret = jax.default_backend() != "gpu"  # smoke runs on CPU
    return api.grouped_matmul(x, w, group_sizes, backend=backend, interpret=interpret, blocks=blocks)


# impl -> (function of (x, w, group_sizes), peer); bf16 in and out, fp32 accumulation.
# "mosaic": Mosaic GPU forward and dX, Triton dW.
IMPLS = {"xla_dense": (_dense, True), "xla_ragged": (_ragged, True),
         "triton": (functools.partial(_ours, "triton"), False),
         "mosaic": (functools.partial(_ours, "mosaic"), False)}
PRESETS = {"default": cases.BENCH_CASES, "smoke": cases.SMOKE_CASES}
# lax.ragged_dot expands to a [G, m, K] operand on the GPU: skipped past this many groups (at
# G = 64, m = 128k, K = 2048 that is 34 GB of bf16).
RAGGED_MAX_GROUPS = 16
# Forward rows-kernel tiles `tune` tries (the heuristic's first); row tile 128 = the layout's.
TUNE_TRITON = (TritonBlocks(), TritonBlocks(block_n=256, num_stages=3),
               TritonBlocks(block_k=32, num_stages=4), TritonBlocks(num_warps=4, num_stages=4),
               TritonBlocks(block_n=64, num_warps=4, num_stages=4), TritonBlocks(group_m=16))
TUNE_MOSAIC = (MosaicTiles(), MosaicTiles(max_concurrent_steps=3), MosaicTiles(tile_k=128, max_concurrent_steps=2),
               MosaicTiles(tile_n=64), MosaicTiles(grid_tile_width=4), MosaicTiles(grid_minor="m"))


def _forward_backward(fn):
    def run(x, w, group_sizes, dy):
        return jax.vjp(lambda x, w: fn(x, w, group_sizes), x, w)[1](dy)
    return run


def measure(case, impl, mode, fn, peer, reps):
    """One row: time (median of reps samples; CUPTI on GPU) and tflops, or error."""
    flops = case.flops() * (1 if mode == "fwd" else 3)
    row = dict(op="grouped_matmul", case=case.name, impl=impl, mode=mode, peer=peer, m=case.m,
               k=case.k, n=case.n, groups=case.n_groups, dtype="bfloat16", flops=flops,
               **_bench.environment())
    try:
        arg_sets = [s if mode == "fwd" else s + (jnp.ones((case.m, case.n), jnp.bfloat16),)
                    for s in cases.gpu_device_inputs(case, jnp.bfloat16, 1)]
        run = fn if mode == "fwd" else _forward_backward(fn)
        compiled = jax.jit(run).lower(*arg_sets[0]).compile()
        seconds = _bench.median_seconds(compiled, arg_sets, reps, min_sample_seconds=2e-3)
        row.update(_bench.throughput(seconds, flops=flops))
    except Exception as e:  # an impl that cannot run here is a row, not a crash
        row["error"] = _bench.error_text(e, limit=200, first_line=True)
    return row


def rows(preset="default", case_names=None, impls=None, modes=("fwd", "fwd_bwd"), reps=20, log=print):
    """One row per (case, impl, mode) with time_ms, tflops, flops, peer, or error; printed (and
    flushed) as each finishes. impls: names to keep (default all)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} unknown; use one of {tuple(PRESETS)}")
    out = []
    for case in _bench.select(PRESETS[preset], case_names):
        for mode in modes:
            for impl, (fn, peer) in IMPLS.items():
                if impls is not None and impl not in impls:
                    continue
                if impl == "xla_ragged" and case.n_groups > RAGGED_MAX_GROUPS:
                    continue
                row = measure(case, impl, mode, fn, peer, reps)
                out.append(row)
                if log:
                    shown = row.get("error") or f"{row['tflops']:.4g} TFLOP/s ({row['time_ms']:.3f} ms)"
                    log(f"{case.name:>28} {mode:>7} {impl:>10}: {shown}", flush=True)
    return out


def _tile_name(blocks) -> str:
    if isinstance(blocks, TritonBlocks):
        return (f"triton[{blocks.block_m}x{blocks.block_n}x{blocks.block_k} w{blocks.num_warps} "
                f"s{blocks.num_stages} g{blocks.group_m}]")
    return (f"mosaic[{blocks.cta_m}x{blocks.cta_n}x{blocks.tile_k} s{blocks.max_concurrent_steps} "
            f"{blocks.grid_minor}{blocks.grid_tile_width}]")


def tune(case_names=("d2048_f4096_e8_32k", "d2048_f512_e64_128k"), reps=20, log=print):
    """Forward rows per tile config of TUNE_TRITON and TUNE_MOSAIC, beside xla_dense, on the
    named BENCH_CASES: which tiles the heuristics in config.py should pick."""
    out = []
    for case in _bench.select(cases.BENCH_CASES, case_names):
        candidates = [("xla_dense", _dense, True)] + [
            (_tile_name(b), functools.partial(_ours, "triton" if isinstance(b, TritonBlocks) else "mosaic",
                                              blocks=b), False) for b in TUNE_TRITON + TUNE_MOSAIC]
        for impl, fn, peer in candidates:
            row = measure(case, impl, "fwd", fn, peer, reps)
            out.append(row)
            if log:
                shown = row.get("error") or f"{row['tflops']:.4g} TFLOP/s ({row['time_ms']:.3f} ms)"
                log(f"{case.name:>28} {impl:>36}: {shown}", flush=True)
    return out
