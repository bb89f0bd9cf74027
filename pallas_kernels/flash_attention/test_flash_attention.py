"""Contract test: every backend's output and gradients against the fp32 reference.

CPU: the reference backend, and the Triton and Mosaic GPU kernels in interpret mode, on small
odd shapes.
GPU (`-m gpu` on the device machine): the same body at real sizes, without interpret mode.
"""
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels._testing import TOLERANCE, assert_close
from pallas_kernels.flash_attention import api, cases, config, mosaic_bwd, mosaic_fwd, triton_fwd
from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.triton_compile import H100

ON_GPU = jax.default_backend() == "gpu"
# Interpret-mode kernels are big XLA programs; on CPU most of a test is their compile time.
_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# On the GPU, XLA autotunes every dot of a program (cuBLAS and Triton GEMM tilings, each compiled
# and timed) at each compile: seconds per test spent speeding up the fp32 reference and the
# einsums beside our kernels, which run once. The Pallas kernels are custom calls, not tuned.
_GPU_COMPILE = {"xla_gpu_autotune_level": 0}


def _jit(fn):
    return jax.jit(fn, compiler_options=_GPU_COMPILE if ON_GPU else _CPU_COMPILE)


def _on_shared_grid(x):
    """Round to multiples of 1/32 in [-255/32, 255/32]: <= 8 significant bits, so bfloat16,
    float16 and float32 all hold each value exactly."""
    return jnp.clip(jnp.round(x * 32.0), -255.0, 255.0) / 32.0


@functools.cache
def _grid_inputs(case):
    """GPU: the case's fp32 draws on the shared grid, so every dtype sees the same values and one
    fp32 reference per case serves all backends and dtypes."""
    def draw():
        q, k, v, dout, segment_ids = case.inputs(jnp.float32)
        return (*(_on_shared_grid(x) for x in (q, k, v, dout)), segment_ids)
    return _jit(draw)()


def _reference_dtype(dtype):
    """The input dtype whose fp32 reference serves `dtype`: on the GPU float32 for all (exact
    casts of the grid inputs), on the CPU `dtype` itself."""
    return jnp.dtype(jnp.float32 if ON_GPU else dtype)


@functools.cache
def _inputs(case, dtype):
    """The case's random q, k, v, dout, segment_ids in `dtype`: drawn in one compiled program per
    (case, dtype) on the CPU; exact casts of the case's grid inputs on the GPU."""
    if ON_GPU:
        *floats, segment_ids = _grid_inputs(case)
        return (*(x.astype(dtype) for x in floats), segment_ids)
    return _jit(lambda: case.inputs(dtype))()


def _out_and_grads(fn, args, dout, dtype=None):
    """fn(*args) and its vjp with cotangent `dout` (random, never ones), in one jitted program;
    `dtype` casts the arrays first (inside the program)."""
    def run(args, dout):
        if dtype is not None:
            args, dout = jax.tree.map(lambda x: x.astype(dtype), (args, dout))
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(dout)
    return _jit(run)(args, dout)


def _assert_grad_close(grad, ref, dtype, what):
    if np.linalg.norm(np.asarray(ref, np.float64)) == 0:
        # e.g. dq and dk when each query sees one key: softmax is constant, the true grad is 0.
        worst = float(np.max(np.abs(np.asarray(grad, np.float64))))
        assert worst < TOLERANCE[jnp.dtype(dtype)], f"{what}: max |grad| {worst:.3g} where exactly 0"
    else:
        assert_close(grad, ref, dtype, what)


def _reference_result(case, dtype):
    """fp32 reference output and grads for the case's inputs in `dtype`: one per (case, dtype)
    on the CPU, one per case on the GPU (see _reference_dtype), shared by the backends."""
    return _cached_reference(case, _reference_dtype(dtype))


@functools.cache
def _cached_reference(case, dtype):
    q, k, v, dout, segment_ids = _inputs(case, dtype)

    def ref(q, k, v):
        return attention_reference(q, k, v, causal=case.causal, segment_ids=segment_ids)

    return _out_and_grads(ref, (q, k, v), dout, dtype=jnp.float32)


def _check_contract(case, backend, dtype, interpret):
    q, k, v, dout, segment_ids = _inputs(case, dtype)

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=case.causal, segment_ids=segment_ids,
                               backend=backend, interpret=interpret, blocks=case.blocks)

    out, grads = _out_and_grads(ours, (q, k, v), dout)
    ref_out, ref_grads = _reference_result(case, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref_out, dtype, f"{backend} out")
    for name, grad, ref_grad, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        _assert_grad_close(grad, ref_grad, dtype, f"{backend} {name}")


DTYPES = (jnp.float32, jnp.bfloat16)
_ids = lambda c: c.name  # noqa: E731


@pytest.mark.parametrize("case", cases.CPU_CASES, ids=_ids)
@pytest.mark.parametrize("backend,dtype", _testing.backend_dtype_params(("reference", "triton"), DTYPES))
def test_matches_reference(backend, dtype, case):
    _check_contract(case, backend, dtype, interpret=backend != "reference" and not ON_GPU)


@pytest.mark.parametrize("causal", (False, True))
def test_reference_is_the_float64_formula(causal):
    """The reference against softmax(q k^T / sqrt(H), masked) v in float64 numpy, query head n
    reading kv head n // (N / K), and its log-sum-exp."""
    q = _testing.normal("reference/q", (2, 33, 8, 64))
    k, v = (_testing.normal(f"reference/{n}", (2, 33, 2, 64)) for n in ("k", "v"))
    q64 = q.astype(np.float64)
    k64, v64 = (np.repeat(a, 4, axis=2).astype(np.float64) for a in (k, v))  # GQA groups of 4
    logits = np.einsum("btnh,bsnh->bnts", q64, k64) / 8.0
    if causal:
        logits = np.where(np.tril(np.ones((33, 33), bool)), logits, -np.inf)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = np.einsum("bnts,bsnh->btnh", np.exp(logits - lse[..., None]), v64)
    out, ours_lse = attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                                        return_lse=True)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_lse), lse, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases.MOSAIC_CPU_CASES, ids=_ids)
def test_mosaic_matches_reference(case):
    """Mosaic forward and backward (GPU interpret mode on CPU: SMEM, barriers, TMA and wgmma
    simulated)."""
    _check_contract(case, "mosaic", jnp.bfloat16, interpret=not ON_GPU)


# Three compute warpgroups (192-row CTAs, FA3's head_dim 64 tile), GQA, T = 200 ragged: padded to
# two CTAs, the last key block masked. Full with T != S; causal with 64-key steps and 3 slots (the
# CTAs' warpgroups need 1/2/3 and 4/5/6 steps: warpgroups 0 and 1 pass turns over the steps only
# later ones need) and with 128-key steps (warpgroups 0 and 1 of the first CTA both need 1 of 2).
_THREE_WGS = dict(overlap=True, compute_wgs=3)
MOSAIC_THREE_WGS_CPU_CASES = (
    cases.Case("t200_s150_gqa2_full_3wgs", 1, 200, 150, 4, 2, 64,
               blocks=config.BlockSizes(mosaic=config.MosaicBlocks(**_THREE_WGS))),
    cases.Case("t200_gqa2_causal_kv64_slots3_3wgs", 1, 200, 200, 4, 2, 64, causal=True,
               blocks=config.BlockSizes(mosaic=config.MosaicBlocks(
                   block_kv=64, max_concurrent_steps=3, **_THREE_WGS))),
    cases.Case("t200_gqa2_causal_3wgs", 1, 200, 200, 4, 2, 64, causal=True,
               blocks=config.BlockSizes(mosaic=config.MosaicBlocks(**_THREE_WGS))),
)


@pytest.mark.parametrize("case", cases.MOSAIC_OVERLAP_CPU_CASES + MOSAIC_THREE_WGS_CPU_CASES,
                         ids=_ids)
def test_mosaic_overlap_forward_matches_reference(case):
    """The Mosaic forward with FA3 intra-warpgroup overlap (case.blocks.mosaic.overlap), with two
    or three compute warpgroups: out and the base-2 lse against the reference's (no backward: its
    kernels do not depend on it)."""
    assert case.blocks.mosaic.overlap
    _check_mosaic_forward(case)


@pytest.mark.parametrize("case", cases.MOSAIC_PERSISTENT_CPU_CASES, ids=_ids)
def test_mosaic_persistent_forward_matches_reference(case):
    """The persistent Mosaic forward (case.blocks.mosaic.persistent), as the test above."""
    assert case.blocks.mosaic.persistent
    _check_mosaic_forward(case)


def _check_mosaic_forward(case):
    q, k, v, _, _ = _inputs(case, jnp.bfloat16)
    ref_out, _ = _reference_result(case, jnp.bfloat16)
    _, lse = attention_reference(q, k, v, causal=case.causal, return_lse=True)
    forward = functools.partial(mosaic_fwd.flash_forward, scale=case.head_dim ** -0.5,
                                causal=case.causal, blocks=case.blocks.mosaic,
                                interpret=not ON_GPU)
    out, lse2 = _jit(forward)(q, k, v)
    assert_close(out, ref_out, jnp.bfloat16, f"mosaic {case.name} out")
    assert_close(lse2, lse / np.log(2.0), jnp.float32, f"mosaic {case.name} lse2")


@pytest.mark.parametrize("case, dtype", [
    pytest.param(case, dtype, id=f"{case.name}-{jnp.dtype(dtype).name}")
    for case, dtype in zip(cases.MOSAIC_BWD_CPU_CASES,
                           (jnp.float16, jnp.bfloat16, jnp.bfloat16, jnp.float16))])
def test_mosaic_backward_matches_reference(case, dtype):
    """The Mosaic dQ and dK/dV kernels alone (or the one-pass dK/dV kernel that forms dQ too),
    fed the fp32 reference's output and lse (in interpret mode on CPU, so no forward kernel is
    simulated): dq, dk, dv against the reference's."""
    q, k, v, dout, _ = _inputs(case, dtype)
    ref_out, ref_grads = _reference_result(case, dtype)
    _, lse = attention_reference(q, k, v, causal=case.causal, return_lse=True)
    backward = functools.partial(mosaic_bwd.flash_backward, scale=case.head_dim ** -0.5,
                                 causal=case.causal,
                                 blocks=(case.blocks or config.BlockSizes()).mosaic_bwd,
                                 interpret=not ON_GPU)
    grads = _jit(backward)(q, k, v, ref_out.astype(dtype), lse / np.log(2.0), dout)
    for name, grad, ref_grad, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        _assert_grad_close(grad, ref_grad, dtype, f"mosaic backward {name}")


def test_mosaic_one_pass_backward_ignores_padded_keys():
    """Ragged S, full attention, fp16, every real score far below 0: a padded key's
    P = exp(0 - lse) (its K row is zero) is ~e^15, past fp16, and dQ reads that dS; it must be
    masked, or dS K is inf * 0 = NaN in every row. (The two-kernel backward masks it in dQ.)"""
    b, t, s, n, kv_heads, h = 1, 64, 130, 2, 1, 128
    keys = jax.random.split(jax.random.key(5), 4)
    u = jax.random.normal(keys[0], (h,), jnp.float32)
    k = u + 0.1 * jax.random.normal(keys[1], (b, s, kv_heads, h), jnp.float32)
    q = jnp.broadcast_to(-1.8 * u, (b, t, n, h))  # q . k / sqrt(h) ~ -20
    v = jax.random.normal(keys[2], (b, s, kv_heads, h), jnp.float32)
    dout = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    q, k, v, dout = (x.astype(jnp.float16) for x in (q, k, v, dout))
    out, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v), *(x.astype(jnp.float32)
                                                                      for x in (q, k, v)))
    _, lse = attention_reference(q, k, v, return_lse=True)
    backward = functools.partial(mosaic_bwd.flash_backward, scale=h ** -0.5, causal=False,
                                 blocks=config.MosaicBwdBlocks(one_pass=True), interpret=not ON_GPU)
    grads = _jit(backward)(q, k, v, out.astype(jnp.float16), lse / np.log(2.0), dout)
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, vjp(dout.astype(jnp.float32))):
        assert np.isfinite(np.asarray(grad, np.float32)).all(), f"{name} not finite"
        _assert_grad_close(grad, ref_grad, jnp.float16, f"one-pass backward {name}")


# GPU matrix: each (backend, dtype) on the cases listed, not the full product (every test compiles
# its own forward and backward kernels). Together: ragged T and S, T != S, GQA 1/2/=heads, causal
# and full, H 64 and 128, segments; Triton in bf16/fp16/fp32, Mosaic in bf16/fp16.
_GPU_MATRIX = {
    ("triton", jnp.bfloat16): [c.name for c in cases.GPU_CASES],
    ("triton", jnp.float16): ["gpu_t17_gqa2_full", "gpu_t1000_mqa_full",
                              "gpu_t4096_segments_causal"],
    ("triton", jnp.float32): ["gpu_t129_mha_causal", "gpu_t1000_gqa2_causal_d64",
                              "gpu_t1024_s3000_gqa2_full"],
    ("mosaic", jnp.bfloat16): [c.name for c in cases.GPU_CASES if not c.segmented],
    ("mosaic", jnp.float16): ["gpu_t17_gqa2_full", "gpu_t2048_mha_causal",
                              "gpu_t1000_gqa2_causal_bwd_tiles",
                              "gpu_t2048_mha_causal_overlap_slots3"],
}


def _gpu_params():
    by_name = {c.name: c for c in cases.GPU_CASES}
    for (backend, dtype), names in _GPU_MATRIX.items():
        for name in names:
            # xdist_group: with `-n N --dist loadgroup` a case's tests share one worker, so its
            # inputs and reference are computed once.
            yield pytest.param(backend, dtype, by_name[name],
                               id=f"{backend}-{jnp.dtype(dtype).name}-{name}",
                               marks=pytest.mark.xdist_group(name))


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype, case", list(_gpu_params()))
def test_matches_reference_gpu(backend, dtype, case):
    _check_contract(case, backend, dtype, interpret=False)


def test_forward_saves_base2_lse():
    case = next(c for c in cases.CPU_CASES if c.blocks is not None and not c.segmented)
    q, k, v, _, _ = _inputs(case, jnp.float32)
    blocks = config.fit_to_shape(case.blocks, case.seq_q, case.seq_kv)
    forward = functools.partial(triton_fwd.flash_forward, segment_ids=None,
                                scale=case.head_dim ** -0.5, causal=case.causal, blocks=blocks,
                                interpret=not ON_GPU)
    _, lse2 = _jit(forward)(q, k, v)
    _, lse = attention_reference(q, k, v, causal=case.causal, return_lse=True)
    assert lse2.dtype == jnp.float32 and lse2.shape == (case.batch, case.heads, case.seq_q)
    assert_close(lse2 * np.log(2.0), lse, jnp.float32, "lse")


@pytest.mark.parametrize("backend, dtype", [("reference", jnp.float32), ("triton", jnp.float32),
                                            ("mosaic", jnp.bfloat16)], ids=["reference", "triton", "mosaic"])
def test_scale_is_applied(backend, dtype):
    """A scale other than head_dim ** -0.5 reaches the kernel's forward and backward passes
    (Mosaic in 16 bits only; in interpret mode on CPU)."""
    q, k, v, dout, _ = _inputs(cases.CPU_CASES[1], dtype)
    out, grads = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, scale=0.3, backend=backend,
                                                                interpret=backend != "reference" and not ON_GPU),
                                (q, k, v), dout)
    want, want_grads = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, scale=0.3), (q, k, v), dout,
                                      dtype=jnp.float32)
    assert_close(out, want, dtype, "scaled out")
    for grad, ref, name in zip(grads, want_grads, "qkv"):
        _assert_grad_close(grad, ref, dtype, f"scaled d{name}")
    unscaled = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert not np.allclose(np.asarray(out, np.float32), unscaled, atol=1e-2)


@pytest.mark.skipif(ON_GPU, reason="checks the CPU choice of backend='auto'")
def test_auto_on_cpu_is_the_reference():
    q, k, v, _, _ = _inputs(cases.CPU_CASES[0], jnp.float32)
    out = flash_attention(q, k, v)
    np.testing.assert_array_equal(out, flash_attention(q, k, v, backend="reference"))


@pytest.mark.parametrize("dtype, segmented, hopper, expected", [
    (jnp.bfloat16, False, True, "mosaic"), (jnp.float16, False, True, "mosaic"),
    (jnp.float32, False, True, "triton"), (jnp.bfloat16, True, True, "triton"),
    (jnp.bfloat16, False, False, "triton")])
def test_auto_on_gpu_picks_mosaic_where_it_serves_on_hopper(dtype, segmented, hopper, expected,
                                                           monkeypatch):
    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    monkeypatch.setattr(api, "_is_hopper", lambda: hopper)
    assert api._choose_backend("auto", head_dim=128, dtype=dtype, segmented=segmented,
                               interpret=False) == expected


def test_auto_falls_back_for_other_head_dims_and_logs_once(caplog):
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 96)) for i in range(3))
    api._warned.clear()
    with caplog.at_level(logging.WARNING, logger=api.__name__):
        first = flash_attention(q, k, v, interpret=True)
        flash_attention(q, k, v, interpret=True)
    assert [r.getMessage() for r in caplog.records if "head_dim=96" in r.getMessage()] == [
        "flash_attention: head_dim=96 has no kernel (supported: (64, 128)); using the reference backend"]
    assert_close(first, attention_reference(q, k, v), jnp.float32, "fallback out")


def _qkv(q_shape=(1, 8, 4, 64), kv_shape=(1, 8, 2, 64), dtype=jnp.float32):
    return jnp.zeros(q_shape, dtype), jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)


@pytest.mark.parametrize("kwargs, match", [
    (dict(q_shape=(8, 4, 64)), r"q must be rank 4 .*q.shape=\(8, 4, 64\)"),
    (dict(kv_shape=(1, 8, 2, 64, 1)), r"k must be rank 4"),
    (dict(q_shape=(1, 8, 3, 64), kv_shape=(1, 8, 2, 64)), r"heads=3 is not divisible by kv_heads=2"),
    (dict(kv_shape=(1, 8, 2, 128)), r"head_dim=64, k and v have head_dim=128"),
    (dict(kv_shape=(2, 8, 2, 64)), r"q.shape\[0\]=1, k.shape\[0\]=2"),
    (dict(dtype=jnp.int32), r"k.dtype=int32"),
    (dict(q_shape=(1, 0, 4, 64)), r"empty dimension: q.shape=\(1, 0, 4, 64\)"),
])
def test_bad_shapes_and_dtypes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*_qkv(**kwargs))


def test_bad_options_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"k.dtype=bfloat16"):
        flash_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match=r"k.shape=\(1, 8, 2, 64\), v.shape=\(1, 9, 2, 64\)"):
        flash_attention(q, k, jnp.zeros((1, 9, 2, 64)))
    with pytest.raises(ValueError, match=r"causal=True needs seq_q == seq_kv; got seq_q=8, seq_kv=9"):
        flash_attention(q, *_qkv(kv_shape=(1, 9, 2, 64))[1:], causal=True)
    with pytest.raises(ValueError, match=r"head_dim=96 unsupported by backend='triton'"):
        flash_attention(*_qkv((1, 8, 4, 96), (1, 8, 2, 96)), backend="triton", interpret=True)
    with pytest.raises(ValueError, match=r"backend='flash' unknown"):
        flash_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"scale=-1.0 must be a positive finite"):
        flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match=r"segment_ids must be an int array .*shape=\(1, 7\)"):
        flash_attention(q, k, v, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match=r"dtype=float32 unsupported by backend='mosaic'"):
        flash_attention(q, k, v, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match=r"segment_ids unsupported by backend='mosaic'"):
        flash_attention(*_qkv(dtype=jnp.bfloat16), backend="mosaic", interpret=True,
                        segment_ids=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"block_q=48 must be a power of two"):
        config.BlockSizes(block_q=48)
    with pytest.raises(ValueError, match=r"block_kv_dkv=32 must be 64, 128, 192 or 256"):
        config.MosaicBwdBlocks(block_kv_dkv=32)
    with pytest.raises(ValueError, match=r"max_concurrent_steps=1 must be >= 2"):
        config.MosaicBwdBlocks(max_concurrent_steps=1)
    with pytest.raises(ValueError, match=r"mosaic_bwd=.* must be a MosaicBwdBlocks"):
        config.BlockSizes(mosaic_bwd=config.MosaicBlocks())
    too_big = config.BlockSizes(mosaic_bwd=config.MosaicBwdBlocks(block_kv_dq=128,
                                                                  max_concurrent_steps=3))
    with pytest.raises(ValueError, match=r"need \d+ bytes of shared memory in the dQ kernel"):
        flash_attention(*_qkv(dtype=jnp.bfloat16, q_shape=(1, 8, 4, 128), kv_shape=(1, 8, 2, 128)),
                        backend="mosaic", interpret=True, blocks=too_big)
    with pytest.raises(ValueError, match=r"one_pass=1 must be a bool"):
        config.MosaicBwdBlocks(one_pass=1)
    one_pass = config.BlockSizes(mosaic_bwd=config.MosaicBwdBlocks(one_pass=True))
    with pytest.raises(ValueError, match=r"one_pass needs head_dim=128 .* got head_dim=64"):
        flash_attention(*_qkv(dtype=jnp.bfloat16, q_shape=(1, 8, 4, 64), kv_shape=(1, 8, 2, 64)),
                        backend="mosaic", interpret=True, blocks=one_pass)
    too_big = config.BlockSizes(mosaic=config.MosaicBlocks(block_kv=256))
    with pytest.raises(ValueError, match=r"forward tiles .* need \d+ bytes of shared memory at "
                                         r"head_dim=128"):
        flash_attention(*_qkv(dtype=jnp.bfloat16, q_shape=(1, 8, 4, 128), kv_shape=(1, 8, 2, 128)),
                        backend="mosaic", interpret=True, blocks=too_big)


def test_mosaic_compute_wgs_options_raise():
    """compute_wgs is 2 or 3, 3 only with overlap; its extra q/out rows count in shared memory."""
    for bad in (1, 4, True, 3.0):
        with pytest.raises(ValueError, match=rf"compute_wgs={bad!r} must be 2 or 3"):
            config.MosaicBlocks(overlap=True, compute_wgs=bad)
    with pytest.raises(ValueError, match=r"compute_wgs=3 needs overlap=True"):
        config.MosaicBlocks(compute_wgs=3)
    two_wgs = config.MosaicBlocks(block_q=128, overlap=True)
    mosaic_fwd.check_smem(two_wgs, 128, jnp.bfloat16)  # 201728 bytes fit, 235008 do not
    with pytest.raises(ValueError, match=r"need 235008 bytes of shared memory at head_dim=128"):
        mosaic_fwd.check_smem(dataclasses.replace(two_wgs, compute_wgs=3), 128, jnp.bfloat16)


def test_traced_scale_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"scale=.*Tracer.* must be a positive finite Python number"):
        jax.jit(lambda s: flash_attention(q, k, v, scale=s))(0.5)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernel backends run without interpret mode")
@pytest.mark.parametrize("backend", ("triton", "mosaic"))
def test_named_kernel_backend_on_cpu_without_interpret_raises(backend):
    with pytest.raises(ValueError, match=rf"backend='{backend}' needs a GPU or interpret=True"):
        flash_attention(*_qkv(dtype=jnp.bfloat16), backend=backend)


_MOSAIC_BLOCKS = {"default": None, "overlap": config.BlockSizes(mosaic=config.MosaicBlocks(overlap=True)),
                  "3wgs": config.BlockSizes(mosaic=config.MosaicBlocks(**_THREE_WGS)),
                  "one_pass": config.BlockSizes(mosaic_bwd=config.MosaicBwdBlocks(one_pass=True))}


@pytest.mark.parametrize("backend, dtype, causal, segmented, head_dim, variant", [
    ("triton", jnp.bfloat16, True, False, 128, "default"),
    ("triton", jnp.float32, False, True, 64, "default"),
    ("triton", jnp.float16, True, True, 64, "default"),
    ("mosaic", jnp.bfloat16, True, False, 128, "default"),
    ("mosaic", jnp.float16, False, False, 64, "default"),
    ("mosaic", jnp.bfloat16, True, False, 128, "overlap"),
    ("mosaic", jnp.bfloat16, False, False, 128, "overlap"),
    ("mosaic", jnp.bfloat16, True, False, 64, "3wgs"), ("mosaic", jnp.float16, False, False, 64, "3wgs"),
    ("mosaic", jnp.bfloat16, True, False, 128, "one_pass"),
    ("mosaic", jnp.float16, False, False, 128, "one_pass")])
def test_kernels_lower_for_h100(backend, dtype, causal, segmented, head_dim, variant, monkeypatch):
    """The forward and backward kernels pass Pallas's lowering for sm_90 on CPU (Triton IR;
    Mosaic GPU with P, dS in registers and seeded accumulators, the path interpret mode cannot
    take). `variant`: the Mosaic forward's "overlap" (intra-warpgroup pipelining: S awaited with
    P V in flight), "3wgs" (that with three compute warpgroups), or the "one_pass" backward
    (its dQ added into an fp32 buffer by TMA reduction, which interpret mode lacks). Compiling
    that to machine code happens only on the GPU."""
    blocks = _MOSAIC_BLOCKS[variant]
    b, t, s, n, kv_heads = 2, 1000, 1000 if causal or segmented else 1500, 8, 2
    q = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((b, s, kv_heads, head_dim), dtype)
    segment_ids = jax.ShapeDtypeStruct((b, t), jnp.int32) if segmented else None

    def fwd_bwd(q, k, v, dout, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, backend=backend, blocks=blocks),
            q, k, v)
        return out, vjp(dout)

    monkeypatch.setattr(api, "_platform", lambda: "gpu")
    monkeypatch.setattr(api, "_is_hopper", lambda: True)
    targets = ("__gpu$xla.gpu.triton", "mosaic_gpu_v2")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=H100)):
        exported = jax.export.export(
            jax.jit(fwd_bwd), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in targets],
        )(q, kv, kv, q, segment_ids)
    module = exported.mlir_module()
    ours, other = targets if backend == "triton" else targets[::-1]
    kernels = 2 if variant == "one_pass" else 3  # forward, dQ (unless one pass), dK/dV
    assert module.count(f"@{ours}(") == kernels  # all of the named backend
    assert module.count(f"@{other}(") == 0
