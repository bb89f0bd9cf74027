"""Autotuner on CPU: the heuristic path, table lookups from a temporary table (and a kernel that
consults it), the search over a toy problem (winner, skipped candidates and their reasons, the
keep-the-default rule, concurrent compiles giving the serial result, each program compiled once),
the search spaces' validity, and the CLI's report helpers."""
import collections
import dataclasses
import json
import logging
import threading
import time
import types

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _testing
from pallas_kernels.autotune import __main__ as cli
from pallas_kernels.autotune import spaces, table, tuner
from pallas_kernels.flash_attention import config as flash_config
from pallas_kernels.matmul import api as matmul_api
from pallas_kernels.matmul import cases as matmul_cases
from pallas_kernels.matmul import config as matmul_config
from pallas_kernels.matmul import reference as matmul_reference

H100 = "NVIDIA H100 80GB HBM3"


def write_table(path, entries):
    path.write_text(json.dumps(entries))
    return path


def test_heuristic_on_cpu_even_with_an_entry(tmp_path):
    default = matmul_config.default_triton_blocks(4096, 4096, 4096, jnp.bfloat16)
    key = table.matmul_key(4096, 4096, 4096, jnp.bfloat16)
    path = write_table(tmp_path / "t.json", {table.device_key(): {"matmul_triton": {
        key: {"config": {"num_warps": 4}}}}})
    assert jax.default_backend() == "cpu"
    assert table.best_config("matmul_triton", key, default, path=path) is default
    assert matmul_config.triton_blocks(4096, 4096, 4096, jnp.bfloat16) == default


def test_lookup_from_a_temporary_table(tmp_path):
    default = flash_config.default_blocks(4096, 4096, 128, jnp.bfloat16, causal=True)
    key = table.flash_attention_key(4096, 4096, 128, True, jnp.bfloat16)
    path = write_table(tmp_path / "t.json", {"nvidia_h100_80gb_hbm3": {"flash_attention": {
        key: {"config": {"block_kv": 128, "num_stages": 2, "mosaic": {"max_concurrent_steps": 3}}}}}})
    tuned = table.best_config("flash_attention", key, default, device_kind=H100, path=path)
    assert tuned == dataclasses.replace(default, block_kv=128, num_stages=2,
                                        mosaic=flash_config.MosaicBlocks(max_concurrent_steps=3))
    other_key = table.flash_attention_key(1024, 1024, 128, True, jnp.bfloat16)
    assert table.best_config("flash_attention", other_key, default, device_kind=H100,
                             path=path) is default
    # Another device on the same chip takes the entry; another chip does not.
    assert table.best_config("flash_attention", key, default, device_kind="NVIDIA H200", path=path) == tuned
    assert table.best_config("flash_attention", key, default, device_kind="NVIDIA A100-SXM4-80GB",
                             path=path) is default


def test_own_entry_wins_over_a_sibling_devices_entry(tmp_path):
    default = matmul_config.TritonBlocks()
    path = write_table(tmp_path / "t.json", {
        "nvidia_h200": {"matmul_triton": {"k1": {"config": {"num_warps": 4}}, "k2": {"config": {"num_warps": 4}}}},
        "nvidia_h100_80gb_hbm3": {"matmul_triton": {"k1": {"config": {"num_warps": 2}}}}})
    assert table.best_config("matmul_triton", "k1", default, device_kind=H100, path=path).num_warps == 2
    assert table.best_config("matmul_triton", "k2", default, device_kind=H100, path=path).num_warps == 4
    assert table.siblings("nvidia_h100_80gb_hbm3", ["nvidia_h200", "nvidia_a100", "nvidia_h100_80gb_hbm3"]) == [
        "nvidia_h200"]
    assert table.siblings("nvidia_a100", ["nvidia_h200"]) == []


def test_stale_entry_falls_back_with_one_warning(tmp_path, caplog):
    default = matmul_config.TritonBlocks()
    path = write_table(tmp_path / "t.json", {"nvidia_h100_80gb_hbm3": {"matmul_triton": {
        "k1": {"config": {"block_mm": 64}}, "k2": {"config": {"block_m": 48}}}}})
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert table.best_config("matmul_triton", "k1", default, device_kind=H100, path=path) is default
        assert table.best_config("matmul_triton", "k2", default, device_kind=H100, path=path) is default
    messages = [r.getMessage() for r in caplog.records]
    assert sum("block_mm" in m for m in messages) == 1
    assert any("block_m=48 must be a power of 2" in m for m in messages)


def test_shape_keys_bucket_to_powers_of_two():
    assert table.matmul_key(1000, 3000, 500, jnp.bfloat16) == table.matmul_key(1024, 4096, 512, "bfloat16")
    assert table.matmul_key(1024, 4096, 512, jnp.bfloat16) == "m=1024,n=4096,k=512,dtype=bfloat16"
    assert table.norms_key("rms_norm", 16000, 4096, jnp.bfloat16) == \
        "fn=rms_norm,rows=16384,hidden=4096,dtype=bfloat16"
    assert table.device_key(H100) == "nvidia_h100_80gb_hbm3"


def test_matmul_kernel_consults_the_table(tmp_path, monkeypatch):
    """With the table switched on (as on a GPU), api.matmul runs the table's blocks."""
    case = matmul_cases.Case("table_37x70x50", 37, 70, 50)
    tuned = {"block_m": 16, "block_n": 32, "block_k": 16, "group_m": 2}
    key = table.matmul_key(case.m, case.n, case.k, jnp.float32)
    monkeypatch.setattr(table, "TABLE", write_table(tmp_path / "t.json", {table.device_key(): {
        "matmul_triton": {key: {"config": tuned}}}}))
    monkeypatch.setattr(table, "on_gpu", lambda: True)
    blocks = matmul_config.triton_blocks(case.m, case.n, case.k, jnp.float32)
    assert (blocks.block_m, blocks.block_n, blocks.block_k, blocks.group_m) == (16, 32, 16, 2)
    seen = []
    real = matmul_api.triton_matmul.matmul
    monkeypatch.setattr(matmul_api.triton_matmul, "matmul",
                        lambda *a, **kw: seen.append(kw["blocks"]) or real(*a, **kw))
    a, b = case.inputs(jnp.float32)
    out = matmul_api.matmul(a, b, backend="triton", interpret=True)
    assert seen == [blocks]
    _testing.assert_close(out, matmul_reference.matmul_reference(a, b), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Toy:
    """A config whose `work` sets how many matmuls the toy program chains; `unused` changes nothing."""
    work: int = 64
    unused: int = 0

    def __post_init__(self):
        if self.work < 1:
            raise ValueError(f"Toy.work={self.work} must be >= 1")


def toy_problem(stages):
    x = jnp.ones((128, 128), jnp.float32) / 128

    def build(config, mode):
        if config.work == 7:  # a candidate that does not compile: shapes that do not match
            return jax.jit(lambda x: x @ jnp.ones((3, 3))), [(x,)]
        if config.work == 9:  # a candidate that runs fast and gives a wrong result
            return jax.jit(lambda x: x * 1.5), [(x,)]

        def chain(x):
            return jax.lax.fori_loop(0, config.work, lambda i, y: y @ x, x)
        return jax.jit(chain), [(x,)]
    return tuner.Problem(kernel="toy", key="n=128", default=Toy(), stages=stages, build=build)


def _time_by_work(monkeypatch):
    """Each candidate compiles and runs as in a real search (a broken one fails as it would),
    but its time is `work` ms instead of a wall-clock reading: which candidate wins must not
    depend on the load of the host running the tests."""
    real_time = tuner._time

    def fake_time(program, reps):
        real_time(program, 1)
        return program.config.work * 1e-3
    monkeypatch.setattr(tuner, "_time", fake_time)


def test_search_keeps_the_fastest_and_records_skips(tmp_path, monkeypatch):
    _time_by_work(monkeypatch)
    problem = toy_problem((tuner.Stage("fwd", (dict(work=0), dict(work=7), dict(work=1))),
                           tuner.Stage("fwd", (dict(work=32),))))
    result = tuner.tune(problem, reps=3, confirm_rounds=1, log=None)
    assert result["best"] == {"work": 1, "unused": 0} and not result["kept_default"]
    assert result["tuned_ms"] == {"fwd": 1.0} and result["default_ms"] == {"fwd": 64.0}
    by_work = {c["overrides"].get("work"): c for c in result["candidates"]}
    assert by_work[0]["error"].startswith("invalid: ValueError: Toy.work=0")
    assert by_work[7]["error"].startswith("RuntimeError: compile:")
    assert by_work[32]["stage"] == 1 and by_work[32]["time_ms"] == 32.0
    path = tmp_path / "t.json"
    table.record([result], device_kind=H100, path=path)
    assert table.best_config("toy", "n=128", Toy(), device_kind=H100, path=path) == Toy(work=1)
    assert table.lookup("toy", "n=128", device_kind=H100, path=path)["kept_default"] is False


def test_a_wrong_result_is_skipped_however_fast(monkeypatch):
    _time_by_work(monkeypatch)
    problem = toy_problem((tuner.Stage("fwd", (dict(work=9), dict(work=16))),))
    result = tuner.tune(problem, reps=1, confirm_rounds=1, log=None)
    assert result["best"] == {"work": 16, "unused": 0}
    wrong = next(c for c in result["candidates"] if c["overrides"].get("work") == 9)
    assert wrong["error"].startswith("RuntimeError: wrong result: max |difference| 0.0039")
    assert "time_ms" not in wrong


def test_winner_slower_on_confirmation_keeps_the_default(monkeypatch):
    """Search timings say work=1 wins; the confirmation round says it is slower: keep the default."""
    search = {64: 2.0, 1: 1.0}
    confirm = {64: 1.0, 1: 1.5}
    calls = []

    def fake_time(program, reps):
        calls.append(program.config.work)
        return (search if len(calls) <= 2 else confirm)[program.config.work]
    monkeypatch.setattr(tuner, "_time", fake_time)
    result = tuner.tune(toy_problem((tuner.Stage("fwd", (dict(work=1),)),)), confirm_rounds=1,
                        log=None)
    assert result["kept_default"] and result["best"] == {"work": 64, "unused": 0}
    assert result["tuned_ms"] == result["default_ms"] == {"fwd": 1000.0}


def test_a_field_the_program_ignores_is_timed_once_for_both():
    """Same lowered program: default and tuned share one timing, so noise cannot flip the choice."""
    result = tuner.tune(toy_problem((tuner.Stage("fwd", (dict(unused=5),)),)), reps=2,
                        confirm_rounds=1, log=None)
    assert result["tuned_ms"] == result["default_ms"] and not result["kept_default"]


@pytest.mark.parametrize("workers", [1, 4])
def test_failing_default_raises(workers):
    problem = toy_problem((tuner.Stage("fwd", (dict(work=1),)),))
    problem = dataclasses.replace(problem, default=Toy(work=7))
    with pytest.raises(RuntimeError, match="starting config fails in mode fwd: compile: TypeError"):
        tuner.tune(problem, reps=1, log=None, workers=workers)


def test_concurrent_compiles_give_the_serial_result(monkeypatch):
    """workers=4 compiles a stage's candidates on several threads at once (build() stays on the
    calling thread) and gives the rows, errors, log lines and winner of workers=1."""
    _time_by_work(monkeypatch)
    real_compile, lock = tuner._compile, threading.Lock()
    running, peak, build_threads = [0], [0], set()

    def slow_compile(fn, arg_sets):  # long enough for the compiles of a stage to overlap
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.05)
            return real_compile(fn, arg_sets)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(tuner, "_compile", slow_compile)
    toy = toy_problem((tuner.Stage("fwd", tuple(dict(work=w) for w in (0, 7, 3, 2, 5, 1))),
                       tuner.Stage("fwd", (dict(work=4), dict(unused=1)))))

    def build(config, mode):
        build_threads.add(threading.current_thread())
        if config.work == 3:
            raise ValueError("no program for work=3")
        return toy.build(config, mode)
    problem = dataclasses.replace(toy, build=build)
    runs = {}
    for workers in (1, 4):
        peak[0], lines = 0, []
        result = tuner.tune(problem, reps=1, confirm_rounds=1, log=lines.append, workers=workers)
        runs[workers] = ({k: result[k] for k in ("best", "candidates", "default_ms", "tuned_ms",
                                                 "kept_default")}, lines, peak[0])
    assert runs[4][:2] == runs[1][:2]
    assert runs[1][2] == 1 and runs[4][2] > 1
    assert build_threads == {threading.main_thread()}
    result, lines, _ = runs[4]
    assert result["best"] == {"work": 1, "unused": 0} and len(lines) == 7
    errors = {c["overrides"].get("work"): c.get("error") for c in result["candidates"]
              if c["stage"] == 0}
    assert errors[0].startswith("invalid: ValueError: Toy.work=0")
    assert errors[7].startswith("RuntimeError: compile:")
    assert errors[3] == "ValueError: no program for work=3"
    assert errors[None] is errors[2] is errors[5] is errors[1] is None


class CountingJit:
    """jax.jit(f) that appends `key` to `compiled` each time a lowering of it is compiled."""

    def __init__(self, f, key, compiled):
        self.jitted, self.key, self.compiled = jax.jit(f), key, compiled

    def lower(self, *args):
        lowered = self.jitted.lower(*args)

        def compile():
            self.compiled.append(self.key)
            return lowered.compile()
        return types.SimpleNamespace(as_text=lowered.as_text, compile=compile)


@pytest.mark.parametrize("workers", [1, 4])
def test_each_program_is_compiled_once(monkeypatch, workers):
    """Two modes, the winner's program differing from the default's in both: the confirmation
    reuses what the search compiled (the default in mode a, the winner in mode b), compiles the
    other two once, and times all four in every round."""
    x = jnp.ones((128, 128), jnp.float32) / 128
    compiled = []

    def build(config, mode):  # mode b chains `unused` more matmuls than mode a
        steps = config.work + (config.unused if mode == "b" else 0)
        chain = lambda x: jax.lax.fori_loop(0, steps, lambda i, y: y @ x, x)  # noqa: E731
        return CountingJit(chain, (config, mode), compiled), [(x,)]
    seconds = {Toy(): 3e-3, Toy(work=1): 2e-3, Toy(work=1, unused=1): 1e-3}
    timed = []
    monkeypatch.setattr(tuner, "_time", lambda program, reps: timed.append(program.config)
                        or seconds[program.config])
    problem = tuner.Problem(kernel="toy", key="n=128", default=Toy(), build=build, stages=(
        tuner.Stage("a", (dict(work=1),)), tuner.Stage("b", (dict(unused=1),))))
    result = tuner.tune(problem, confirm_rounds=3, log=None, workers=workers)
    assert result["best"] == {"work": 1, "unused": 1} and not result["kept_default"]
    assert result["default_ms"] == {"a": 3.0, "b": 3.0}
    assert result["tuned_ms"] == {"a": 1.0, "b": 1.0}
    assert collections.Counter(compiled) == collections.Counter(
        [(Toy(), "a"), (Toy(work=1), "a"), (Toy(work=1), "b"), (Toy(work=1, unused=1), "b"),
         (Toy(work=1, unused=1), "a"), (Toy(), "b")])
    # The search timed 4 programs; then 3 rounds of default and winner in each of 2 modes.
    assert collections.Counter(timed[4:]) == {Toy(): 6, Toy(work=1, unused=1): 6}


@pytest.mark.parametrize("op", spaces.OPS)
def test_every_candidate_is_a_valid_config(op):
    problems = spaces.problems(op)
    assert problems and len({(p.kernel, p.key) for p in problems}) == len(problems)
    for problem in problems:
        for stage in problem.stages:
            assert stage.candidates
            for overrides in stage.candidates:
                table.apply_fields(problem.default, overrides)  # raises on a bad candidate


def test_problem_filters_and_unknown_op():
    found = spaces.problems("matmul", ["m8192_n8192_k8192"], ["matmul_mosaic"])
    assert [(p.kernel, p.key) for p in found] == [
        ("matmul_mosaic", "m=8192,n=8192,k=8192,dtype=bfloat16")]
    with pytest.raises(ValueError, match="op='conv' has no search space"):
        spaces.problems("conv")


def test_flash_problems_cover_the_table_cases_and_fit_shared_memory():
    """Named cases come from the issue's whole table; Mosaic tiles that overflow shared memory at
    the case's head_dim are left out of the space."""
    from pallas_kernels.flash_attention import mosaic_fwd
    found = spaces.problems("flash_attention", ["s2k_d64_causal", "s8k_d128_full"])
    assert [(p.kernel, p.key.split(",")[0]) for p in found] == [
        (kernel, t) for t in ("t=2048", "t=8192") for kernel in
        ("flash_attention", "flash_attention_mosaic", "flash_attention_mosaic_bwd")]
    widest, overlaps, warpgroups = {}, set(), {}
    for problem in found[1::3] + found[2::3]:
        assert problem.default == table.apply_fields(problem.default, {})
        for overrides in problem.stages[0].candidates:
            tiles = table.apply_fields(problem.default, overrides)
            if problem.kernel == "flash_attention_mosaic":
                widest[problem.key] = max(widest.get(problem.key, 0), tiles.block_kv)
                overlaps.add(tiles.overlap)
                head_dim = problem.key.split("h=")[1].split(",")[0]
                warpgroups.setdefault(head_dim, set()).add(tiles.compute_wgs)
    assert sorted(widest.values()) == [128, 256]  # at H=128 two 192-key slots overflow (H100 count)
    assert overlaps == {False, True}
    assert warpgroups == {"64": {2, 3}, "128": {2}}  # 3 warpgroups' registers fit only at H=64
    with pytest.raises(ValueError, match="need 2[0-9]+ bytes of shared memory at head_dim=128"):
        mosaic_fwd.check_smem(flash_config.MosaicBlocks(block_kv=256), 128, jnp.bfloat16)
    bwd = {p.stages[0].mode for p in found if p.kernel == "flash_attention_mosaic_bwd"}
    assert bwd == {"mosaic_fwd_bwd"}


def test_cli_parse_and_report(tmp_path):
    op, options = cli.parse(["attention", "cases=['s4k_d128_full']", "reps=5"])
    assert op == "flash_attention" and options["cases"] == ["s4k_d128_full"] and options["reps"] == 5
    with pytest.raises(SystemExit, match="op='conv' unknown"):
        cli.parse(["conv"])
    with pytest.raises(SystemExit, match="option 'speed=3'"):
        cli.parse(["norms", "speed=3"])
    assert cli.parse(["norms", "workers=3"])[1]["workers"] == 3
    with pytest.raises(SystemExit, match="workers=0 must be an int >= 1"):
        cli.parse(["norms", "workers=0"])
    result = dict(kernel="toy", key="n=1", default={"work": 64}, best={"work": 1},
                  default_ms={"fwd": 2.0}, tuned_ms={"fwd": 1.0})
    text = cli.summary([result, dict(kernel="toy", key="n=2", error="RuntimeError: boom")])
    assert "2.00x" in text and "{'work': 1}" in text and "boom" in text
    cli.plot([result], tmp_path / "r.png", "toy")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_cli_main_writes_table_and_report(tmp_path, monkeypatch):
    """End to end on CPU with the toy problem standing in for an op's search space."""
    failing = dataclasses.replace(toy_problem(()), key="n=bad", default=Toy(work=7),
                                  stages=(tuner.Stage("fwd", ()),))
    found = [toy_problem((tuner.Stage("fwd", (dict(work=1),)),)), failing]
    monkeypatch.setattr(spaces, "problems", lambda op, cases, kernels: found)
    _time_by_work(monkeypatch)
    table_path = tmp_path / "table.json"
    status = cli.main(["norms", f"table='{table_path}'", f"out='{tmp_path}'", "reps=2"])
    assert status == 1  # one problem could not run its default
    assert table.best_config("toy", "n=128", Toy(), device_kind="cpu", path=table_path) == Toy(work=1)
    report = json.loads(next(tmp_path.glob("autotune-norms_cpu_*.json")).read_text())
    assert [r["key"] for r in report["results"]] == ["n=128", "n=bad"]
    assert "starting config fails" in report["results"][1]["error"]
    assert next(tmp_path.glob("autotune-norms_cpu_*.png")).stat().st_size > 1000
