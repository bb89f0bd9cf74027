"""Flash-attention benchmark: cases x IMPLS x {fwd, fwd_bwd} -> rows. No argparse, no files.

`experiments/bench_kernels.py flash_attention` calls `rows()` and writes the results.
B batch, T query length, S key length, N heads, H head dim.
"""
import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _bench
from pallas_kernels.flash_attention import cases, config
from pallas_kernels.flash_attention.api import flash_attention

MODES = ("fwd", "fwd_bwd")


def attention_flops(case: cases.Case, mode: str) -> float:
    """4·B·T·S·N·H for the forward (q k^T and p v, 2 FLOPs per multiply-add), half when causal;
    the backward counts 2.5x the forward (five matmuls to two), so fwd_bwd is 3.5x."""
    fwd = 4 * case.batch * case.seq_q * case.seq_kv * case.heads * case.head_dim
    fwd *= 0.5 if case.causal else 1.0
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


@dataclasses.dataclass(frozen=True)
class Impl:
    attend: object  # (q, k, v, causal) -> out
    peer: bool  # True for the implementations we compare against
    blocks: config.BlockSizes | None = None  # ours only; None: the default heuristic
    mosaic_bwd: config.MosaicBwdBlocks | None = None  # ours: this backward over `blocks`

    def blocks_for(self, q, k, causal):
        """The BlockSizes ours runs at these operands (the tuned table's when blocks is None)."""
        blocks = self.blocks or config.tuned_blocks(q.shape[1], k.shape[1], q.shape[3], causal,
                                                    q.dtype)
        return dataclasses.replace(blocks, mosaic_bwd=self.mosaic_bwd) if self.mosaic_bwd else blocks


def _ours(backend, blocks=None, mosaic_bwd=None):
    def attend(q, k, v, causal):
        interpret = jax.default_backend() != "gpu"  # smoke runs on CPU
        return flash_attention(q, k, v, causal=causal, backend=backend, interpret=interpret,
                               blocks=impl.blocks_for(q, k, causal) if mosaic_bwd else blocks)
    impl = Impl(attend, peer=False, blocks=blocks, mosaic_bwd=mosaic_bwd)  # attend reads it
    return impl


def _jax_nn(implementation):
    def attend(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    return Impl(attend, peer=True)


# Backend names as everywhere (STYLE 2.5); `peer` marks what ours is compared against.
# "mosaic" is the Mosaic GPU forward and backward.
IMPLS = {"triton": _ours("triton"), "mosaic": _ours("mosaic"), "cudnn": _jax_nn("cudnn"),
         "xla": _jax_nn("xla")}
# The Mosaic forward, then the one-pass backward (MosaicBwdBlocks.one_pass; head_dim 128).
_ONE_PASS = _ours("mosaic", mosaic_bwd=config.MosaicBwdBlocks(one_pass=True))


def _tuning_impls():
    """Tile candidates at H=128 bf16 (preset "tune"), cuDNN beside them: Triton forward and
    backward tiles, and Mosaic forward tiles (`mosaic[...]` rows time its forward)."""
    base = config.default_blocks(4096, 4096, 128, jnp.bfloat16, causal=False)
    variants = {
        "default": {},
        "fwd_kv128_s2": dict(block_kv=128, num_stages=2),
        "fwd_q64_w4": dict(block_q=64, num_warps=4),
        "bwd_all64_w8_s3": dict(block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
                                num_warps_bwd=8, num_stages_bwd=3),
        "bwd_dq128x64_dkv64x128_w8_s2": dict(block_q_dq=128, block_kv_dq=64, block_q_dkv=64,
                                             block_kv_dkv=128, num_warps_bwd=8, num_stages_bwd=2),
        "bwd_dq64x32_dkv32x64_w4_s4": dict(block_q_dq=64, block_kv_dq=32, block_q_dkv=32,
                                           block_kv_dkv=64, num_warps_bwd=4, num_stages_bwd=4),
    }
    impls = {f"triton[{name}]": _ours("triton", dataclasses.replace(base, **kw))
             for name, kw in variants.items()}
    return {**impls, **_mosaic_fwd_impls()}


# Mosaic forward tiles (presets "tune", "tune_mosaic"): name -> MosaicBlocks fields. At H=128, 3
# slots of 128 keys or 2 of 192 fill the H100's shared memory.
_MOSAIC_FWD_VARIANTS = {
    "kv128_steps2": {},  # the default
    "kv128_steps3": dict(max_concurrent_steps=3),
    "kv64_steps4": dict(block_kv=64, max_concurrent_steps=4),
    "kv192_steps2": dict(block_kv=192),
    "kv128_steps2_overlap": dict(overlap=True),
    "kv128_steps3_overlap": dict(max_concurrent_steps=3, overlap=True),
    "kv64_steps4_overlap": dict(block_kv=64, max_concurrent_steps=4, overlap=True),
    "kv192_steps2_overlap": dict(block_kv=192, overlap=True),
}


def _mosaic_fwd_impls():
    """Mosaic forward tile candidates at H=128 bf16 (`mosaic[...]` rows; fwd_bwd adds the default
    Mosaic backward), cuDNN beside them."""
    base = config.default_blocks(4096, 4096, 128, jnp.bfloat16, causal=False)
    impls = {f"mosaic[{name}]": _ours("mosaic", dataclasses.replace(
        base, mosaic=config.MosaicBlocks(**fields))) for name, fields in _MOSAIC_FWD_VARIANTS.items()}
    return {**impls, "cudnn": IMPLS["cudnn"]}


# Backward tiles (preset "tune_bwd"): name -> (dQ block_q x block_kv, dK/dV block_q x block_kv,
# num_warps_bwd, num_stages_bwd). dK/dV block_kv and dQ block_q are the M of every dot in their
# kernel (wgmma: a multiple of 64 per warpgroup); the other block is streamed.
_BWD_VARIANTS = {
    "dq128x32_dkv32x128_w8_s3": ((128, 32), (32, 128), 8, 3),  # the default at H=128
    "dq128x32_dkv32x128_w4_s5": ((128, 32), (32, 128), 4, 5),  # Triton tutorial; old default
    "dq128x32_dkv32x128_w4_s3": ((128, 32), (32, 128), 4, 3),
    "dq128x32_dkv32x128_w8_s2": ((128, 32), (32, 128), 8, 2),
    "dq128x32_dkv32x128_w8_s5": ((128, 32), (32, 128), 8, 5),
    "dq128x64_dkv64x128_w8_s2": ((128, 64), (64, 128), 8, 2),
    "dq128x64_dkv64x128_w8_s3": ((128, 64), (64, 128), 8, 3),
    "dq128x64_dkv64x128_w4_s3": ((128, 64), (64, 128), 4, 3),
    "dq128x32_dkv64x128_w8_s3": ((128, 32), (64, 128), 8, 3),
    "dq128x64_dkv32x128_w8_s3": ((128, 64), (32, 128), 8, 3),
    "dq64x64_dkv64x64_w4_s2": ((64, 64), (64, 64), 4, 2),
    "dq64x64_dkv64x64_w4_s3": ((64, 64), (64, 64), 4, 3),
    "dq64x32_dkv32x64_w4_s4": ((64, 32), (32, 64), 4, 4),
    "dq128x128_dkv64x128_w8_s2": ((128, 128), (64, 128), 8, 2),
}


# Mosaic backward tiles (preset "tune_bwd"): name -> MosaicBwdBlocks fields. block_q_dq and
# block_kv_dkv are a compute warpgroup's rows (its wgmma M); the other two are streamed per step.
_MOSAIC_BWD_VARIANTS = {
    "dq64x64_dkv64x64_s2": {},  # the default
    "dq64x64_dkv64x64_s3": dict(max_concurrent_steps=3),
    "dq64x128_dkv64x64_s2": dict(block_kv_dq=128),
    "dq64x64_dkv128x64_s2": dict(block_q_dkv=128),
    "dq64x128_dkv128x64_s2": dict(block_kv_dq=128, block_q_dkv=128),
    "one_pass_dkv64x64_s2": dict(one_pass=True),
    "one_pass_dkv64x64_s3": dict(one_pass=True, max_concurrent_steps=3),
}


def _tuning_bwd_impls():
    """Backward tile candidates at H=128 bf16 (preset "tune_bwd"; forward tiles at the default):
    Triton backward tiles, Mosaic backward tiles (`mosaic[...]` rows, behind the Mosaic forward),
    cuDNN beside them. Timed as fwd_bwd only: subtract the forward of preset "tune" for the
    backward alone."""
    base = config.default_blocks(4096, 4096, 128, jnp.bfloat16, causal=False)
    impls = {}
    for name, ((bq_dq, bkv_dq), (bq_dkv, bkv_dkv), warps, stages) in _BWD_VARIANTS.items():
        blocks = dataclasses.replace(base, block_q_dq=bq_dq, block_kv_dq=bkv_dq,
                                     block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv,
                                     num_warps_bwd=warps, num_stages_bwd=stages)
        impls[f"triton[{name}]"] = _ours("triton", blocks)
    for name, fields in _MOSAIC_BWD_VARIANTS.items():
        blocks = dataclasses.replace(base, mosaic_bwd=config.MosaicBwdBlocks(**fields))
        impls[f"mosaic[{name}]"] = _ours("mosaic", blocks)
    return {**impls, "cudnn": IMPLS["cudnn"]}


_S4K = tuple(c for c in cases.BENCH_CASES if c.seq_q == 4096)  # D=128, full and causal
_TABLE_IMPLS = {name: IMPLS[name] for name in ("mosaic", "cudnn", "xla")}
PRESETS = {
    # preset -> (cases, impls, modes); impls None: the tuning candidates of `_TUNING[preset]`
    "default": (cases.BENCH_CASES, IMPLS, MODES),
    "full": (cases.BENCH_CASES_FULL, IMPLS, MODES),
    # The table (S 1k-16k, D 64 and 128, full and causal) without Triton; table_d64 and
    # table_d128 are its halves (each well within one 10-minute device call).
    "table": (cases.BENCH_CASES_FULL, _TABLE_IMPLS, MODES),
    **{f"table_d{h}": (tuple(c for c in cases.BENCH_CASES_FULL if c.head_dim == h), _TABLE_IMPLS,
                       MODES) for h in (64, 128)},
    # The cases of the speed targets (S >= 4k, D 128, full and causal), ours against cuDNN (~2 min).
    "targets_d128": (tuple(c for c in cases.BENCH_CASES_FULL if c.head_dim == 128 and c.seq_q >= 4096),
                     {name: IMPLS[name] for name in ("mosaic", "cudnn")}, MODES),
    # Forward only, ours against cuDNN at D=64 (~1 min): to check a forward change quickly.
    "fwd_d64": (tuple(c for c in cases.BENCH_CASES_FULL if c.head_dim == 64),
                {name: IMPLS[name] for name in ("mosaic", "cudnn")}, ("fwd",)),
    # The one-pass backward against the two-kernel one and cuDNN, D=128 (fwd+bwd only).
    "one_pass_d128": (tuple(c for c in cases.BENCH_CASES_FULL if c.head_dim == 128),
                      {"mosaic": IMPLS["mosaic"], "mosaic_one_pass": _ONE_PASS,
                       "cudnn": IMPLS["cudnn"]},
                      ("fwd_bwd",)),
    "tune": (_S4K, None, MODES),
    "tune_bwd": (_S4K, None, ("fwd_bwd",)),
    # Mosaic forward tiles and overlap at 4k and 16k, D=128 (forward only; ~2 min on an H100).
    "tune_mosaic": (tuple(c for c in cases.BENCH_CASES if c.seq_q >= 4096), None, ("fwd",)),
    "smoke": (cases.SMOKE_CASES, {"triton": IMPLS["triton"], "xla": IMPLS["xla"]}, MODES),  # CPU
}
_TUNING = {"tune": _tuning_impls, "tune_bwd": _tuning_bwd_impls, "tune_mosaic": _mosaic_fwd_impls}


def _program(attend, causal, mode):
    if mode == "fwd":
        return jax.jit(lambda q, k, v, dout: attend(q, k, v, causal))

    def fwd_bwd(q, k, v, dout):
        _, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, causal), q, k, v)
        return vjp(dout)
    return jax.jit(fwd_bwd)


def _measure(case, name, impl, mode, args, reps):
    blocks = None if impl.peer else impl.blocks_for(args[0], args[1], case.causal)
    row = dict(op="flash_attention", case=case.name, impl=name, mode=mode, peer=impl.peer,
               batch=case.batch, seq=case.seq_q, heads=case.heads, head_dim=case.head_dim,
               causal=case.causal, dtype=jnp.dtype(args[0].dtype).name,
               config=None if blocks is None else repr(blocks))
    try:
        compiled = _program(impl.attend, case.causal, mode).lower(*args).compile()
        memory = compiled.memory_analysis()
        if memory is not None:  # XLA scratch beyond inputs and outputs: O(S^2) for "xla"
            row["temp_bytes"] = int(memory.temp_size_in_bytes)
        # A sample is >= ~2 ms of calls back to back: launch overhead stays out of short kernels.
        seconds = _bench.median_seconds(compiled, [args], reps, min_sample_seconds=2e-3)
        row.update(_bench.throughput(seconds, flops=attention_flops(case, mode)))
    except Exception as e:  # a peer that cannot run this shape is a row, not a crash
        row["error"] = _bench.error_text(e, limit=200, first_line=True)
    return row


def rows(preset: str = "default", reps: int = 20, log=print) -> list[dict]:
    """One row per (case, impl, mode): time_ms (median of `reps` samples after warm-up), tflops,
    temp_bytes (XLA scratch), peer (True for cudnn/xla), config (ours), or error."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} unknown; use one of {tuple(PRESETS)}")
    bench_cases, impls, modes = PRESETS[preset]
    impls = _TUNING[preset]() if impls is None else impls
    out = []
    for case in bench_cases:
        q, k, v, dout, _ = case.inputs(jnp.bfloat16)  # 64 MiB each at B*S = 16k: beyond L2
        for name, impl in impls.items():
            for mode in modes:
                row = _measure(case, name, impl, mode, (q, k, v, dout), reps)
                out.append(row)
                if log:
                    shown = row.get("error") or f"{row['tflops']:.4g} TFLOP/s ({row['time_ms']:.3f} ms)"
                    log(f"{case.name:>16} {name:>28} {mode:>8}: {shown}")
    return out
