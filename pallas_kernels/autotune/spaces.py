"""Search spaces: the tuning problems of each op at its benchmark shapes.

`problems(op)` gives tuner.Problems for "matmul", "flash_attention" or "norms" (table kernels
matmul_triton, matmul_jax_triton, matmul_mosaic, flash_attention (Triton tiles),
flash_attention_mosaic (the MosaicBlocks of the Mosaic forward), flash_attention_mosaic_bwd (the
MosaicBwdBlocks of the Mosaic backward, timed forward and backward), norms). Each problem starts
from the kernel's heuristic default (never from the table, so re-tuning is not anchored to an old
winner) and times the public API with an explicit config, as a caller would run it.
"""
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp

from pallas_kernels.autotune import table
from pallas_kernels.autotune.tuner import Problem, Stage

OPS = ("matmul", "flash_attention", "norms")


def problems(op: str, case_names=None, kernels=None) -> list[Problem]:
    """Problems of `op` at its benchmark shapes; case_names / kernels (table names) filter them."""
    builders = {"matmul": _matmul_problems, "flash_attention": _flash_problems,
                "norms": _norms_problems}
    if op not in builders:
        raise ValueError(f"op={op!r} has no search space; use one of {OPS}")
    found = builders[op](case_names)
    return [p for p in found if kernels is None or p.kernel in kernels]


def _lazy(make):
    """make() on the first call only: problems are listed without drawing their (large) inputs."""
    return functools.cache(make)


# ---- matmul ----

_TRITON_TILES = [  # block_m, block_n, block_k, num_warps, num_stages
    (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
    (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 5),
    (128, 256, 32, 8, 4), (128, 128, 128, 8, 2), (64, 256, 64, 8, 3), (16, 256, 128, 4, 4),
    (32, 128, 128, 4, 4),
]
_MOSAIC_TILES = [  # tile_m, tile_n, tile_k, max_concurrent_steps, wg_dimension
    (128, 128, 64, 4, "n"), (128, 128, 64, 3, "n"), (128, 128, 64, 4, "m"), (128, 128, 64, 5, "n"),
    (128, 256, 64, 3, "m"), (128, 192, 64, 3, "m"), (64, 128, 64, 4, "n"), (64, 256, 64, 4, "n"),
    (128, 128, 128, 2, "n"), (64, 64, 64, 4, "n"),
]
_MOSAIC_GRID = [(minor, width) for minor in ("n", "m") for width in (1, 4, 8, 16)]


def _matmul_problems(case_names):
    from pallas_kernels import _bench
    from pallas_kernels.matmul import api, cases, config
    from pallas_kernels.triton import unavailable_reason

    problems = []
    for case in _bench.select(cases.BENCH_CASES, case_names):
        for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
            fp8 = dtype == jnp.float8_e4m3fn
            key = table.matmul_key(case.m, case.n, case.k, dtype)
            nbytes = case.nbytes(dtype, jnp.bfloat16)
            n_sets = 1 if 2 * nbytes > 256 << 20 else 4  # small inputs rotate out of L2
            arg_sets = _lazy(functools.partial(cases.gpu_device_inputs, case, dtype, n_sets))
            mode = "fp8" if fp8 else "bf16"
            triton_default = config.default_triton_blocks(case.m, case.n, case.k, dtype)
            triton_stages = (
                Stage(mode, tuple(_fitted_triton(t, case) for t in _TRITON_TILES)),
                Stage(mode, tuple(dict(group_m=g) for g in (1, 4, 8, 16))),
            )
            backends = ["triton"] + ([] if unavailable_reason() else ["jax_triton"])
            backends += [] if fp8 else ["mosaic"]
            for backend in backends:
                def run(cfg, a, b, backend=backend, fp8=fp8):
                    if fp8:
                        return api.scaled_matmul(a, b, 0.5, 0.25, backend=backend, blocks=cfg)
                    return api.matmul(a, b, backend=backend, blocks=cfg)
                if backend == "mosaic":
                    default = config.default_mosaic_tiles(case.m, case.n, case.k, dtype)
                    stages = (Stage(mode, tuple(dict(tile_m=m, tile_n=n, tile_k=k,
                                                     max_concurrent_steps=s, wg_dimension=w)
                                                for m, n, k, s, w in _MOSAIC_TILES)),
                              Stage(mode, tuple(dict(grid_minor=g, grid_tile_width=w)
                                                for g, w in _MOSAIC_GRID)))
                else:
                    default, stages = triton_default, triton_stages
                def build(cfg, mode, run=run, arg_sets=arg_sets):
                    del mode  # one program per problem
                    return jax.jit(functools.partial(run, cfg)), arg_sets()
                problems.append(Problem(
                    kernel=f"matmul_{backend}", key=key, default=default, stages=stages,
                    build=build, flops={mode: case.flops()}, nbytes={mode: nbytes}))
    return problems


def _fitted_triton(tile, case):
    """A Triton tile candidate clipped to the case's shape, as field overrides."""
    from pallas_kernels.matmul import config
    m, n, k, warps, stages = tile
    blocks = config.fit_to_shape(config.TritonBlocks(block_m=m, block_n=n, block_k=k,
                                                     num_warps=warps, num_stages=stages),
                                 case.m, case.n, case.k)
    return dict(block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
                num_warps=warps, num_stages=stages)


# ---- flash attention ----

_FLASH_FWD = [  # block_q, block_kv, num_warps, num_stages
    (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4),
    (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 4), (64, 32, 4, 4),
]
_FLASH_BWD = [  # (dQ block_q, block_kv), (dK/dV block_q, block_kv), num_warps_bwd, num_stages_bwd
    ((128, 64), (64, 128), 8, 3), ((128, 64), (64, 128), 8, 2), ((128, 32), (32, 128), 8, 3),
    ((128, 32), (32, 128), 4, 5), ((128, 64), (64, 128), 4, 3), ((128, 32), (64, 128), 8, 3),
    ((64, 64), (64, 64), 4, 3), ((64, 32), (32, 64), 4, 4), ((128, 128), (64, 128), 8, 2),
]
# Mosaic forward: block_q (a compute warpgroup's rows), block_kv, max_concurrent_steps (K/V
# slots); each with intra-warpgroup overlap off and on (it needs registers for a second score tile,
# so it may lose with wide tiles).
# Tiles that overflow shared memory at the case's head_dim are left out (block_kv 256 and 4 slots
# of 128 keys fit at H=64 only; 3 slots of 128 or 2 of 192 fill an H100 at H=128).
_FLASH_MOSAIC = [(64, 128, 2), (64, 128, 3), (64, 128, 4), (64, 192, 2), (64, 192, 3),
                 (64, 256, 2), (64, 64, 3), (64, 64, 4), (128, 64, 2)]
# Each two-warpgroup tile is also tried persistent (one CTA per SM; twice the Q shared memory).
# Three compute warpgroups (FA3's 192-row tile; overlap only): block_kv, slots. Head dim 64 only:
# at 128 a warpgroup's O and two score tiles overflow its 160 registers.
_FLASH_MOSAIC_3WG = [(128, 2), (128, 3), (64, 4), (192, 2)]
# Mosaic backward: block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv, max_concurrent_steps[,
# one_pass].
_FLASH_MOSAIC_BWD = [(64, 64, 64, 64, 2), (64, 64, 64, 64, 3), (64, 128, 64, 64, 2),
                     (64, 64, 128, 64, 2), (64, 128, 128, 64, 2),
                     (64, 64, 64, 64, 2, True)]  # one pass (head_dim 128; 3 slots: 20% slower)


def _fitting(make, candidates, head_dim, check):
    """make(*c) for each candidate c whose tiles fit shared memory at head_dim (check raises)."""
    out = []
    for c in candidates:
        try:
            check(make(*c), head_dim, jnp.bfloat16)
        except ValueError:
            continue
        out.append(dataclasses.asdict(make(*c)))
    return tuple(out)


def _flash_problems(case_names):
    from pallas_kernels import _bench
    from pallas_kernels.flash_attention import bench, cases, config, mosaic_bwd, mosaic_fwd
    from pallas_kernels.flash_attention.api import flash_attention

    # Named cases may come from the whole table (S 1k-16k, H 64 and 128); all: the default.
    found = cases.BENCH_CASES if case_names is None else _bench.select(cases.BENCH_CASES_FULL,
                                                                       case_names)
    problems = []
    for case in found:
        dtype = jnp.bfloat16
        inputs = _lazy(lambda case=case: case.inputs(dtype)[:4])  # q, k, v, dout

        def run(cfg, q, k, v, dout, backend, causal=case.causal):
            return flash_attention(q, k, v, causal=causal, backend=backend, blocks=cfg)

        def build(cfg, mode, run=run, inputs=inputs):
            # mode: "fwd" / "fwd_bwd" (Triton kernels), "mosaic_fwd" / "mosaic_fwd_bwd" (Mosaic).
            backend = "mosaic" if mode.startswith("mosaic") else "triton"
            if mode.endswith("fwd_bwd"):
                def fn(q, k, v, dout):
                    _, vjp = jax.vjp(lambda q, k, v: run(cfg, q, k, v, dout, backend), q, k, v)
                    return vjp(dout)
            else:
                def fn(q, k, v, dout):
                    return run(cfg, q, k, v, dout, backend)
            return jax.jit(fn), [inputs()]

        key = table.flash_attention_key(case.seq_q, case.seq_kv, case.head_dim, case.causal, dtype)
        default = config.default_blocks(case.seq_q, case.seq_kv, case.head_dim, dtype, case.causal)
        fwd, fwd_bwd = bench.attention_flops(case, "fwd"), bench.attention_flops(case, "fwd_bwd")
        problems.append(Problem(
            kernel="flash_attention", key=key, default=default, build=build,
            stages=(
                Stage("fwd", tuple(dict(block_q=bq, block_kv=bkv, num_warps=w, num_stages=s)
                                   for bq, bkv, w, s in _FLASH_FWD)),
                Stage("fwd_bwd", tuple(dict(block_q_dq=dq[0], block_kv_dq=dq[1],
                                            block_q_dkv=dkv[0], block_kv_dkv=dkv[1],
                                            num_warps_bwd=w, num_stages_bwd=s)
                                       for dq, dkv, w, s in _FLASH_BWD))),
            flops={"fwd": fwd, "fwd_bwd": fwd_bwd}))

        def build_mosaic(tiles, mode, build=build, default=default):
            return build(dataclasses.replace(default, mosaic=tiles), mode)
        mosaic_tiles = _fitting(
            lambda bq, bkv, s: config.MosaicBlocks(block_q=bq, block_kv=bkv, max_concurrent_steps=s),
            _FLASH_MOSAIC, case.head_dim, mosaic_fwd.check_smem)
        three_wg_tiles = _fitting(
            lambda bkv, s: config.MosaicBlocks(block_kv=bkv, max_concurrent_steps=s, overlap=True,
                                               compute_wgs=3),
            _FLASH_MOSAIC_3WG if case.head_dim == 64 else [], case.head_dim, mosaic_fwd.check_smem)
        persistent_tiles = _fitting(
            lambda bq, bkv, s: config.MosaicBlocks(block_q=bq, block_kv=bkv, max_concurrent_steps=s,
                                                   persistent=True),
            _FLASH_MOSAIC, case.head_dim, mosaic_fwd.check_smem)
        problems.append(Problem(
            kernel="flash_attention_mosaic", key=key, default=default.mosaic, build=build_mosaic,
            stages=(Stage("mosaic_fwd", tuple(dict(tiles, overlap=overlap)
                                              for tiles in mosaic_tiles + persistent_tiles
                                              for overlap in (False, True)) + three_wg_tiles),),
            flops={"mosaic_fwd": fwd}))

        def build_mosaic_bwd(tiles, mode, build=build, default=default):
            return build(dataclasses.replace(default, mosaic_bwd=tiles), mode)
        problems.append(Problem(
            kernel="flash_attention_mosaic_bwd", key=key, default=default.mosaic_bwd,
            build=build_mosaic_bwd,
            stages=(Stage("mosaic_fwd_bwd", _fitting(config.MosaicBwdBlocks, _FLASH_MOSAIC_BWD,
                                                     case.head_dim, mosaic_bwd.check_smem)),),
            flops={"mosaic_fwd_bwd": fwd_bwd}))
    return problems


# ---- norms ----

def _norm_inputs(shape, dtype):
    """One argument set: x, residual, weight, bias, dy, d(new residual)."""
    keys = jax.random.split(jax.random.key(0), 6)
    draw = lambda i, s: jax.random.normal(keys[i], s, jnp.float32).astype(dtype)  # noqa: E731
    hidden = shape[-1]
    return [(draw(0, shape), draw(1, shape), 1 + 0.1 * draw(2, (hidden,)), draw(3, (hidden,)),
             draw(4, shape), draw(5, shape))]


def _norms_problems(case_names):
    from pallas_kernels import _bench
    from pallas_kernels.norms import api, bench, config as norm_config

    problems = []
    sms = norm_config.sm_count()
    for case in _bench.select(bench.CASES, case_names):
        dtype = jnp.bfloat16
        rows, hidden = math.prod(case.shape[:-1]), case.shape[-1]
        inputs = _lazy(functools.partial(_norm_inputs, case.shape, dtype))
        fn = getattr(api, case.fn)
        residual, bias = "residual" in case.fn, case.fn.startswith("layer")

        def call(cfg, x, r, w, b, fn=fn, residual=residual, bias=bias):
            args = (x,) + ((r,) if residual else ()) + (w,) + ((b,) if bias else ())
            out = fn(*args, backend="triton", config=cfg)
            return out if residual else (out,)

        def build(cfg, mode, call=call, inputs=inputs, residual=residual):
            if mode == "fwd":
                return jax.jit(lambda x, r, w, b, dy, ds: call(cfg, x, r, w, b)), inputs()

            def fwd_bwd(x, r, w, b, dy, ds):
                out, vjp = jax.vjp(lambda *a: call(cfg, *a), x, r, w, b)
                return out, vjp((dy, ds)[:2 if residual else 1])
            return jax.jit(fwd_bwd), inputs()

        width = 1 << (hidden - 1).bit_length()
        fwd_tiles = [dict(block_rows=br, num_warps=w) for br, w in
                     itertools.product((1, 2, 4, 8), (4, 8, 16)) if br * width <= 32768]
        bwd = [dict(bwd_num_warps=w, bwd_programs=p * sms)
               for w, p in itertools.product((4, 8, 16), (1, 2, 4, 8))]
        problems.append(Problem(
            kernel="norms", key=table.norms_key(case.fn, rows, hidden, dtype),
            default=norm_config.default_config(rows, hidden, interpret=False),
            stages=(Stage("fwd", tuple(fwd_tiles)), Stage("fwd_bwd", tuple(bwd))), build=build,
            nbytes={m: bench.nominal_bytes(case, dtype, m) for m in ("fwd", "fwd_bwd")}))
    return problems
