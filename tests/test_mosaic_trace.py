"""mosaic_trace: the profiler switch, region names in the traced program, and the summary of a
trace (built here by hand in Mosaic GPU's format: each warpgroup's first stamp is the global
timer in us, later stamps add SM cycles / 1e3)."""
import json

import jax
import pytest

from pallas_kernels import mosaic_trace

CLOCK_GHZ = 2.0  # 2000 cycles a microsecond


def _events(tid, sm, start_us, regions):
    """B/E events of one warpgroup: regions are (name, begin cycle, end cycle), the first at 0."""
    stamps = []
    for name, begin, end in regions:
        stamps += [(begin, "B", name), (end, "E", name)]
    return [dict(name=name, ph=ph, ts=start_us + cycle / 1e3, pid=sm, tid=tid)
            for cycle, ph, name in sorted(stamps, key=lambda s: (s[0], s[1] == "B"))]


def _trace():
    """Two warpgroups a CTA. SM 1: CTA 0 at 100 us (10k cycles = 5 us), CTA 1 at 105 us, right
    after it (gap 0), 12k cycles = 6 us. SM 2: CTA 2 at 100 us, 20k cycles = 10 us. The kernel
    spans 100-111 us; SM 2 idles its last 1 us."""
    events = []
    for cta, sm, start, cycles in ((0, 1, 100.0, 10_000), (1, 1, 105.0, 12_000), (2, 2, 100.0, 20_000)):
        steps = [("step", 1000 * i, 1000 * i + 800) for i in range(1, 4)]
        events += _events(2 * cta + 1, sm, start, [("tile", 0, cycles)] + steps)
        events += _events(2 * cta + 2, sm, start, [("tile", 0, cycles // 2)])  # memory warpgroup
    return {"displayTimeUnit": "ns", "traceEvents": events}


def test_summary_with_a_known_clock(tmp_path):
    path = tmp_path / "1-trace.json"
    path.write_text(json.dumps(_trace()))
    summary = mosaic_trace.summarize(path, warpgroups=2, clock_ghz=CLOCK_GHZ)
    assert summary["ctas"] == 3 and summary["sms"] == 2
    assert summary["kernel_us"] == pytest.approx(11.0)
    assert summary["cta_us"] == pytest.approx(dict(mean=7.0, min=5.0, max=10.0))
    assert summary["busy"] == pytest.approx(21 / 22)
    assert summary["tail_idle"] == pytest.approx(1 / 22)
    assert summary["gap_us"] == pytest.approx(0.0)
    step, tile = summary["regions"]["step"], summary["regions"]["tile"]
    assert step["mean_us"] == pytest.approx(0.4) and step["per_cta"] == 3
    assert step["total_per_cta_us"] == pytest.approx(1.2)
    # tile: each CTA's two warpgroups, full and half length, averaged: 0.75 x the CTA's length
    assert tile["total_per_cta_us"] == pytest.approx(0.75 * 7.0)


def test_clock_is_estimated_from_back_to_back_ctas():
    summary = mosaic_trace.summarize(_trace(), warpgroups=2)
    assert summary["clock_ghz"] == pytest.approx(CLOCK_GHZ)  # CTA 1 starts as CTA 0 ends
    assert summary["kernel_us"] == pytest.approx(11.0)


def test_summary_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="warpgroups=0"):
        mosaic_trace.summarize(_trace(), warpgroups=0)
    with pytest.raises(ValueError, match="no regions"):
        mosaic_trace.summarize({"traceEvents": []}, warpgroups=2)
    one_cta_per_sm = {"traceEvents": _events(1, 1, 0.0, [("tile", 0, 100)])}
    with pytest.raises(ValueError, match="pass clock_ghz"):
        mosaic_trace.summarize(one_cta_per_sm, warpgroups=1)
    assert mosaic_trace.summarize(one_cta_per_sm, warpgroups=1, clock_ghz=1.0)["cta_us"]["max"] == 0.1


def test_profiler_is_on_only_inside_recording(tmp_path):
    assert mosaic_trace.compiler_params(approx_math=True).profile_space == 0
    with mosaic_trace.recording(tmp_path / "traces", regions=64):
        params = mosaic_trace.compiler_params(approx_math=True)
    assert params.approx_math and params.profile_space == 64
    assert params.profile_dir == str(tmp_path / "traces") and (tmp_path / "traces").is_dir()
    assert mosaic_trace.compiler_params().profile_dir == ""
    with pytest.raises(ValueError, match="regions=0"):
        with mosaic_trace.recording(tmp_path, regions=0):
            pass
    with pytest.raises(FileNotFoundError, match="no \\*-trace.json"):
        mosaic_trace.newest_trace(tmp_path)


def test_region_names_the_traced_equations():
    jaxpr = jax.make_jaxpr(mosaic_trace.region("softmax")(lambda x: x * 2.0))(1.0)
    assert "softmax" in str(jaxpr.eqns[0].source_info.name_stack)


@pytest.mark.gpu
def test_forward_trace_on_the_gpu(tmp_path):
    """The Mosaic forward, traced: one CTA per 128-row tile, each warpgroup's steps all there."""
    from pallas_kernels.flash_attention.api import flash_attention
    from pallas_kernels.flash_attention.config import BlockSizes, MosaicBlocks

    b, t, n, h = 2, 2048, 8, 128  # 256 CTAs: SMs run two in a row (the clock estimate)
    q, k, v = (jax.random.normal(jax.random.key(i), (b, t, n, h), jax.numpy.bfloat16) for i in range(3))
    blocks = BlockSizes(mosaic=MosaicBlocks(block_q=64, block_kv=128, overlap=True))
    with mosaic_trace.recording(tmp_path) as folder:
        out = jax.jit(lambda q, k, v: flash_attention(q, k, v, backend="mosaic", blocks=blocks))(q, k, v)
    jax.block_until_ready(out)
    jax.effects_barrier()
    summary = mosaic_trace.summarize(mosaic_trace.newest_trace(folder), warpgroups=3)
    assert summary["ctas"] == b * n * t // 128
    steps = summary["regions"]["step"]
    assert steps["per_cta"] == 2 * (t // 128 - 1)  # two compute warpgroups; step 0 is first_step
    assert summary["regions"]["first_step"]["per_cta"] == 2
    assert 0.5 < summary["clock_ghz"] < 2.5 and 0 < summary["busy"] <= 1
