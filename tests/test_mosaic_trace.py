"""mosaic_trace: the profiler switch, region names in the traced program, and the summary of a
trace, written here by Mosaic GPU's own dump (ProfilerSpec.dump: numpy, no GPU needed) from a
buffer laid out as the kernels fill it: per warpgroup a header (global timer in ns, SM id,
entries used) and then (region id | EXIT bit, SM cycles) pairs."""
import json

import jax
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels import mosaic_trace

CLOCK_GHZ = 2.0  # 2000 cycles a microsecond
ENTRIES = 64  # a warpgroup's buffer: 3 header entries, 2 a stamp


def _dump(tmp_path, ctas, warpgroups=2):
    """Trace JSON of `ctas`: per CTA (sm, start_ns, [regions of warpgroup 0, of warpgroup 1, ...]),
    a region (name, begin cycle, end cycle); a warpgroup's first stamp is cycle 0."""
    spec = profiler.ProfilerSpec(ENTRIES)
    buffer = np.zeros((len(ctas), warpgroups, ENTRIES), np.uint32)
    for cta, (sm, start_ns, per_warpgroup) in enumerate(ctas):
        for wg, regions in enumerate(per_warpgroup):
            stamps = sorted([(b, 0, spec.intern_name(n)) for n, b, _ in regions]
                            + [(e, 1, spec.intern_name(n) | spec.EXIT) for n, _, e in regions],
                            key=lambda s: (s[0], -s[1]))  # at a tie, an exit first
            pairs = [x for cycle, _, tag in stamps for x in (tag, cycle)]
            buffer[cta, wg, :3 + len(pairs)] = [start_ns, sm, len(pairs), *pairs]
    path = tmp_path / "kernel-1-trace.json"
    with open(path, "w") as f:
        spec.dump(buffer.reshape(-1), f, grid=(len(ctas),), block=(128 * warpgroups,))
    return path


def _ctas():
    """Two warpgroups a CTA. SM 1: CTA 0 at 100 us (10k cycles = 5 us), CTA 1 at 105 us, right
    after it (gap 0), 12k cycles = 6 us. SM 2: CTA 2 at 100 us, 20k cycles = 10 us. The kernel
    spans 100-111 us; SM 2 idles its last 1 us. Warpgroup 0 runs three 400-cycle steps."""
    ctas = []
    for sm, start_ns, cycles in ((1, 100_000, 10_000), (1, 105_000, 12_000), (2, 100_000, 20_000)):
        steps = [("step", 1000 * i, 1000 * i + 800) for i in range(1, 4)]
        ctas.append((sm, start_ns, [[("tile", 0, cycles)] + steps, [("tile", 0, cycles // 2)]]))
    return ctas


def test_summary_with_a_known_clock(tmp_path):
    summary = mosaic_trace.summarize(_dump(tmp_path, _ctas()), warpgroups=2, clock_ghz=CLOCK_GHZ)
    assert summary["ctas"] == 3 and summary["sms"] == 2
    # the dump takes its estimate of the profiler's own cost (up to 11 cycles) off each stamp
    near = lambda x: pytest.approx(x, abs=0.05)  # noqa: E731  us
    assert summary["kernel_us"] == near(11.0)
    assert summary["cta_us"] == near(dict(mean=7.0, min=5.0, max=10.0))
    assert summary["busy"] == pytest.approx(21 / 22, abs=0.01)
    assert summary["tail_idle"] == pytest.approx(1 / 22, abs=0.01)
    assert summary["gap_us"] == near(0.0)
    step, tile = summary["regions"]["step"], summary["regions"]["tile"]
    assert step["mean_us"] == near(0.4) and step["per_cta"] == 3
    assert step["total_per_cta_us"] == near(1.2)
    # tile: each CTA's two warpgroups, full and half length, averaged: 0.75 x the CTA's length
    assert tile["per_cta"] == 1 and tile["total_per_cta_us"] == near(0.75 * 7.0)


def test_clock_is_estimated_from_back_to_back_ctas(tmp_path):
    summary = mosaic_trace.summarize(json.loads(_dump(tmp_path, _ctas()).read_text()), warpgroups=2)
    assert summary["clock_ghz"] == pytest.approx(CLOCK_GHZ, rel=0.01)  # CTA 1 starts as CTA 0 ends
    assert summary["kernel_us"] == pytest.approx(11.0, abs=0.1)


def test_summary_rejects_what_it_cannot_read(tmp_path):
    path = _dump(tmp_path, _ctas())
    with pytest.raises(ValueError, match="warpgroups=0"):
        mosaic_trace.summarize(path, warpgroups=0)
    with pytest.raises(ValueError, match="clock_ghz=40"):
        mosaic_trace.summarize(path, warpgroups=2, clock_ghz=40)
    with pytest.raises(ValueError, match="no regions"):
        mosaic_trace.summarize({"traceEvents": []}, warpgroups=2)
    one_cta_per_sm = _dump(tmp_path, [(1, 0, [[("tile", 0, 1000)]]), (2, 0, [[("tile", 0, 1000)]])],
                           warpgroups=1)
    with pytest.raises(ValueError, match="pass clock_ghz"):
        mosaic_trace.summarize(one_cta_per_sm, warpgroups=1)
    summary = mosaic_trace.summarize(one_cta_per_sm, warpgroups=1, clock_ghz=1.0)
    assert summary["cta_us"]["max"] == pytest.approx(1.0, abs=0.02) and summary["sms"] == 2


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


def test_trace_attention_reports_and_plots_a_summary(tmp_path, capsys):
    from experiments import trace_attention

    summary = mosaic_trace.summarize(_dump(tmp_path, _ctas()), warpgroups=2)
    row = dict(case="s4k_d128_full", kernel="_kernel", call_ms=0.8, **summary)
    text = trace_attention.line(row)
    assert text.startswith("s4k_d128_full _kernel: 11.0 us traced (0.800 ms untraced call), 3 CTAs")
    assert "step 1.2 us (3x)" in text
    trace_attention.plot([row, dict(row, kernel="other", error="ValueError: no clock")],
                         tmp_path / "phases.png", "test")
    assert (tmp_path / "phases.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        trace_attention.parse_args(["--label", "a b"])
    capsys.readouterr()
    if jax.default_backend() != "gpu":
        assert trace_attention.main([]) == 2
        assert "needs a GPU" in capsys.readouterr().err


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
    # each compute warpgroup: step 0 in first_step, the other 128-key steps in step
    assert summary["regions"]["step"]["per_cta"] == t // 128 - 1
    assert summary["regions"]["first_step"]["per_cta"] == 1
    assert 0.5 < summary["clock_ghz"] < 2.5 and 0 < summary["busy"] <= 1
