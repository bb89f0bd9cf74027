"""Automatic layout search, Alpa-style in two levels: enumerate and rank on paper, then
compile and time the top few (`experiments.shard_sweep --auto`).

1. Enumerate: every factorization of the device count over the mesh axes a preset uses
   (`PRESET_AXES`) x rule presets x remat policies (x microbatch counts for the pipeline
   layouts `pp` and `pp_fsdp`), keeping those `check_divisibility` / `check_pipeline` accept.
2. Prune by memory: a layout is dropped only if its predicted bytes per device exceed the
   device's memory (`Hardware.memory_bytes`) by more than the model's error
   (`PRUNE_SLACK`), so a layout that fits is never dropped. The prediction is the model
   states plus `sharding.memory`'s activation bytes (within ~20% of the compiled step,
   above it under remat where XLA reuses buffers); states are a lower bound by
   construction (the weights a preset leaves whole, norms and biases, are counted split).
3. Rank by predicted step time (`predict`), the sum of
     compute  = max(F / (n · peak), F / (n · (1 - bubble) · solo)) / mfu
       F = tokens · (6·N + 12·L·d·T) plus what remat recomputes: `full` one more forward
       (2·N + 4·L·d·T per token), `dots` the attention's batched matmuls (4·L·d·T; the
       policy saves only matmuls without batch dims), the pipeline step one more forward
       (its backward is a vjp recomputed from the stage input);
       bubble = (p-1)/(m+p-1) for p stages and m microbatches (GPipe and 1F1B alike);
       peak the rate per device with all devices busy, solo one device's alone: equal for
       devices of their own (GPUs: the bubble costs 1/(1-bubble)); virtual devices sharing
       a host's cores (the CPU mesh) run faster alone, so other devices fill the bubble.
     comm     = sum over collectives of count · (latency + ring · bytes / bandwidth),
       ring = 2(g-1)/g for an all-reduce over g devices, (g-1)/g for an all-gather or
       reduce-scatter, 1 for a pipeline send; bandwidth the link's, or for the tensor axis
       (kept within a node) `Hardware.tensor_link_bytes_per_s`. Per step (`collectives`):
       data-parallel gradient all-reduce over the batch axes (zero1: reduce-scatter +
       all-gather); fsdp: per pass over a layer (forward, backward; in a pipeline each
       microbatch's forward tick and its backward tick, which recomputes the forward) an
       all-gather of each weight tensor on its own (`layer_tensors`; on small models the
       count of these, not their bytes, is the cost) and one reduce-scatter of the layer's
       grads; tensor parallel: per layer and micro-batch 2 all-reduces of the [b, T, D]
       activation forward and 2 backward (+2 under full remat), sequence parallel an
       all-gather and a reduce-scatter for each; pipeline: each tick sends an activation
       forward and a gradient back.
   The constants come from the machine at hand (`measure_hardware`): matmul rates at the
   model's own feed-forward shape, all devices busy and one alone, and the all-reduce
   latency and bandwidth, each timed as the per-iteration slope of a loop compiled into one
   program, so dispatch is not counted as latency.

Psi / N params, L layers, d d_model, T sequence length, b sequences per device per
micro-batch, g group size. Configs are read by attribute; nothing here imports llmjax.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from sharding.axes import MESH_AXES
from sharding.memory import activation_bytes, pipeline_activation_bytes
from sharding.mesh import check_divisibility
from sharding.pipeline import check_pipeline, pipeline_rules, schedule_stats

REMATS = ("none", "dots", "full")
PIPELINE_PRESETS = {"pp": "dp", "pp_fsdp": "fsdp"}  # pipeline layout -> rules of the other axes
# The mesh axes a layout spreads devices over; the first `required` of them must be > 1
# (a size-1 split is another preset already enumerated: fsdp over 1 device is dp).
PRESET_AXES = {
    "dp": (("data",), ()),
    "fsdp": (("data", "fsdp"), ("fsdp",)),
    "zero1": (("data", "fsdp"), ("fsdp",)),
    "tp": (("data", "tensor"), ("tensor",)),
    "sp": (("data", "tensor"), ("tensor",)),
    "fsdp_tp": (("data", "fsdp", "tensor"), ("fsdp", "tensor")),
    "pp": (("data", "pipeline"), ("pipeline",)),
    # pp_fsdp with data > 1 too aborts XLA's CPU SPMD partitioner in jax 0.11.2 (a failed
    # CHECK in spmd_partitioner_util.cc kills the process), so its batch stays on fsdp alone.
    "pp_fsdp": (("fsdp", "pipeline"), ("fsdp", "pipeline")),
}
PRESETS = tuple(PRESET_AXES)
MICROBATCHES = (1, 2, 4, 8)
PRUNE_SLACK = 0.25  # predicted memory may exceed the compiled step's by this fraction


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate: a rule preset (or pipeline layout), mesh sizes, remat, microbatches.

    Reads like a `MeshConfig` (one int attribute per mesh axis, `rules`), so
    `sharding.mesh` checks accept it.
    """

    preset: str
    sizes: tuple[tuple[str, int], ...]  # (mesh axis, size > 1), in MESH_AXES order
    remat: str = "none"
    microbatches: int = 1  # pipeline microbatches (pipeline layouts only)
    schedule: str = "1f1b"

    def __getattr__(self, axis):
        if axis in MESH_AXES:
            return dict(self.sizes).get(axis, 1)
        raise AttributeError(axis)

    @property
    def rules(self) -> str:
        return PIPELINE_PRESETS.get(self.preset, self.preset)

    @property
    def mesh_shape(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    @property
    def name(self) -> str:
        mesh = ",".join(f"{a}={s}" for a, s in self.sizes) or "1"
        pp = f"/{self.schedule}/m{self.microbatches}" if self.preset in PIPELINE_PRESETS else ""
        return f"{self.preset}{pp} {mesh} remat={self.remat}"


def factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    """Every ordered k-tuple of positive ints whose product is n."""
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, k - 1)]


def enumerate_layouts(model_cfg, n_devices: int, micro_batch: int, seq_len: int, *,
                      presets=PRESETS, remats=REMATS, microbatches=MICROBATCHES,
                      schedule: str = "1f1b", max_tensor: int | None = None) -> list[Layout]:
    """Every layout of `n_devices` the model divides: factorizations x presets x remat
    (x microbatch counts for pipeline layouts).

    Args:
      model_cfg: a `ModelConfig` (or anything with its size attributes).
      micro_batch: sequences per micro-batch (train.batch_size // train.grad_accum).
      max_tensor: the largest tensor split (e.g. 8, one NVLink node); default no limit.
    Raises:
      ValueError: an unknown preset or remat policy (the message lists the allowed ones).
    """
    bad = [p for p in presets if p not in PRESET_AXES] + [r for r in remats if r not in REMATS]
    if bad:
        raise ValueError(f"unknown layout search choice {bad[0]!r}; presets: {', '.join(PRESETS)}; "
                         f"remat: {', '.join(REMATS)}")
    out = []
    for preset in presets:
        axes, required = PRESET_AXES[preset]
        pipelined = preset in PIPELINE_PRESETS
        for split in factorizations(n_devices, len(axes)):
            sizes = dict(zip(axes, split))
            if any(sizes[a] == 1 for a in required) or sizes.get("tensor", 1) > (max_tensor or n_devices):
                continue
            ordered = tuple((a, sizes[a]) for a in MESH_AXES if sizes.get(a, 1) > 1)
            for m in microbatches if pipelined else (1,):
                layout = Layout(preset, ordered, microbatches=m, schedule=schedule)
                try:
                    if pipelined:
                        check_pipeline(n_layers=model_cfg.n_layers, stages=layout.pipeline,
                                       micro_batch=micro_batch, microbatches=m,
                                       batch_ways=layout.data * layout.fsdp)
                        check_divisibility(model_cfg, layout, micro_batch // m, seq_len=seq_len,
                                           rules=pipeline_rules(layout.rules)[0])
                    else:
                        check_divisibility(model_cfg, layout, micro_batch, seq_len=seq_len)
                except ValueError:
                    continue
                out += [dataclasses.replace(layout, remat=r) for r in remats]
    return out


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the cost model needs of a device and its links (per device)."""

    peak_flops: float  # FLOP/s with every device busy (a datasheet peak, or a measured matmul rate)
    mfu: float  # fraction of peak the model's matmuls reach
    link_bytes_per_s: float  # collective bandwidth per device
    link_latency_s: float  # fixed cost per collective
    memory_bytes: float  # usable memory per device
    tensor_link_bytes_per_s: float | None = None  # tensor-parallel collectives (NVLink); default the link
    # FLOP/s of one device while the others idle; default peak_flops (devices of their own,
    # as GPUs). Virtual devices sharing a host's cores run faster alone: a pipeline stage's
    # idle time is then filled by the other devices' work instead of being lost.
    solo_flops: float | None = None
    # The backend the step is compiled for ("cpu", "gpu"): what it saves for the backward
    # pass differs (`sharding.memory.layer_activation_bytes`); default jax's default backend.
    platform: str | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The cost model's view of one layout (seconds per step, bytes per device)."""

    layout: Layout
    compute_s: float
    comm_s: float
    bubble: float
    comm_bytes: float
    state_bytes: float
    activation_bytes: float
    comm_ops: float = 0.0  # collectives per step

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def memory_bytes(self) -> float:
        return self.state_bytes + self.activation_bytes


def _itemsize(dtype) -> int:
    return np.dtype(dtype).itemsize


def state_bytes(layout: Layout, n_params: float, param_dtype="float32", opt_moments: int = 2) -> float:
    """Params + grads + Adam moments per device, every tensor split over the mesh axes the
    preset shards weights on (zero1: the moments only). Grads in fp32 and moments in the
    param dtype, as `llmjax.train` keeps them."""
    s = layout.mesh_shape
    model_ways = s["tensor"] * s["pipeline"]
    weight_ways = model_ways * (s["fsdp"] if layout.rules in ("fsdp", "fsdp_tp") else 1)
    opt_ways = model_ways * (s["fsdp"] if layout.rules in ("fsdp", "fsdp_tp", "zero1") else 1)
    p = _itemsize(param_dtype)
    return n_params * ((p + 4) / weight_ways + opt_moments * p / opt_ways)


def predicted_activation_bytes(layout: Layout, model_cfg, micro_batch: int, seq_len: int,
                               platform: str | None = None) -> float:
    """`sharding.memory`'s activation bytes per device for this layout's mesh and remat."""
    shape = layout.mesh_shape
    if layout.preset in PIPELINE_PRESETS:
        in_flight = schedule_stats(layout.schedule, layout.pipeline, layout.microbatches)["max_in_flight"]
        return pipeline_activation_bytes(model_cfg, shape, pipeline_rules(layout.rules)[0],
                                         micro_batch=micro_batch // layout.microbatches, seq_len=seq_len,
                                         in_flight=in_flight, remat=layout.remat, platform=platform)
    return activation_bytes(model_cfg, shape, layout.rules, micro_batch=micro_batch, seq_len=seq_len,
                            remat=layout.remat, platform=platform)


def collectives(layout: Layout, model_cfg, n_params: float, batch_size: int, grad_accum: int,
                seq_len: int, layer_tensors: int = 12) -> list[tuple[str, float, int, float, str]]:
    """(kind, bytes, group size, count per step, mesh axis) of each collective one device
    takes part in; kinds: all-reduce, all-gather, reduce-scatter, send (see the module
    docstring); the axis says which link it runs on. `layer_tensors`: weight tensors per
    layer (gpt2 16, llama 9): fsdp gathers each one on its own, so on a small model their
    count, not their bytes, sets the cost."""
    s = layout.mesh_shape
    rules, pipe, tensor = layout.rules, s["pipeline"], s["tensor"]
    param_b = _itemsize(model_cfg.param_dtype)
    layers = model_cfg.n_layers // pipe
    local = n_params / (tensor * pipe)  # params this device's model-parallel slice holds
    out = []
    batch_ways = s["data"] * s["fsdp"]
    act = batch_size // grad_accum // batch_ways * seq_len * model_cfg.d_model * _itemsize(model_cfg.dtype)
    # Passes over this device's layers per micro-batch, forward + backward: 1 + 1, or for a
    # pipeline m microbatches, each a forward tick and a backward tick that recomputes it.
    m = layout.microbatches
    gathers, scatters = (3 * m, m) if pipe > 1 else (2, 1)
    if rules in ("fsdp", "fsdp_tp"):
        f = s["fsdp"]
        weight = local * param_b / layers / layer_tensors
        out += [("all-gather", weight, f, gathers * layers * layer_tensors * grad_accum, "fsdp"),
                ("reduce-scatter", local * 4 / layers, f, scatters * layers * grad_accum, "fsdp")]
        if s["data"] > 1:
            out.append(("all-reduce", local * 4 / f, s["data"], 1, "data"))
    elif rules == "zero1" and s["fsdp"] > 1:
        out += [("reduce-scatter", local * 4, s["fsdp"], 1, "fsdp"),
                ("all-gather", local * param_b, s["fsdp"], 1, "fsdp")]
        if s["data"] > 1:
            out.append(("all-reduce", local * 4 / s["fsdp"], s["data"], 1, "data"))
    elif batch_ways > 1:
        out.append(("all-reduce", local * 4, batch_ways, 1, "data"))
    if tensor > 1:
        per_layer = (4 + (2 if layout.remat == "full" else 0)) * layers * grad_accum
        if rules == "sp":  # each all-reduce becomes an all-gather and a reduce-scatter (same bytes)
            out += [(kind, act, tensor, per_layer, "tensor") for kind in ("all-gather", "reduce-scatter")]
        else:
            out.append(("all-reduce", act, tensor, per_layer, "tensor"))
    if pipe > 1:
        out.append(("send", act / m, 2, 2 * (m + pipe - 1) * grad_accum, "pipeline"))
    return out


_RING = {"all-reduce": lambda g: 2 * (g - 1) / g, "all-gather": lambda g: (g - 1) / g,
         "reduce-scatter": lambda g: (g - 1) / g, "send": lambda g: 1.0}


def step_flops(model_cfg, n_params: float, tokens: float, seq_len: int, remat: str,
               pipelined: bool) -> float:
    """Training FLOPs of one step: tokens · (6·N + 12·L·d·T) plus the recomputed forwards."""
    dense, attn = 2 * n_params, 4 * model_cfg.n_layers * model_cfg.d_model * seq_len  # one forward
    per_token = 3 * (dense + attn)
    per_token += {"none": 0.0, "dots": attn, "full": dense + attn}[remat]
    if pipelined:
        per_token += dense + attn
    return tokens * per_token


def predict(layout: Layout, model_cfg, n_params: float, hw: Hardware, *, batch_size: int,
            grad_accum: int, seq_len: int, state_bytes_fn=None, layer_tensors: int = 12) -> Prediction:
    """The cost and memory of one layout (formulas in the module docstring).

    `state_bytes_fn(layout)`, when given, replaces the closed-form `state_bytes` (e.g. the
    exact `sharding.memory.estimate_train_memory` of a concrete state).
    """
    n = math.prod(layout.mesh_shape.values())
    pipelined = layout.preset in PIPELINE_PRESETS
    bubble = (layout.pipeline - 1) / (layout.microbatches + layout.pipeline - 1) if pipelined else 0.0
    flops = step_flops(model_cfg, n_params, batch_size * seq_len, seq_len, layout.remat, pipelined)
    # All devices busy at peak, or the critical path (one device's share, stretched by the
    # bubble) at the rate of a device alone: whichever is longer.
    compute = max(flops / (n * hw.peak_flops), flops / (n * (1 - bubble) * (hw.solo_flops or hw.peak_flops))) / hw.mfu
    comm_s = comm_bytes = comm_ops = 0.0
    for kind, size, group, count, axis in collectives(layout, model_cfg, n_params, batch_size, grad_accum,
                                                      seq_len, layer_tensors):
        moved = _RING[kind](group) * size
        bandwidth = hw.tensor_link_bytes_per_s if axis == "tensor" and hw.tensor_link_bytes_per_s else \
            hw.link_bytes_per_s
        comm_bytes += count * moved
        comm_ops += count
        comm_s += count * (hw.link_latency_s + moved / bandwidth)
    states = state_bytes_fn(layout) if state_bytes_fn else state_bytes(layout, n_params, model_cfg.param_dtype)
    acts = predicted_activation_bytes(layout, model_cfg, batch_size // grad_accum, seq_len, hw.platform)
    return Prediction(layout, compute, comm_s, bubble, comm_bytes, states, acts, comm_ops)


def too_big(pred: Prediction, memory_bytes: float) -> bool:
    """The prune rule: predicted bytes beyond the device's memory plus the model's error."""
    return pred.memory_bytes > memory_bytes * (1 + PRUNE_SLACK)


def search(model_cfg, n_params: float, n_devices: int, hw: Hardware, *, batch_size: int,
           grad_accum: int, seq_len: int, state_bytes_fn=None, layer_tensors: int = 12, **enumerate_kw):
    """(ranked, pruned): the layouts that fit, fastest predicted first, and those that
    cannot (`too_big`). `enumerate_kw` go to `enumerate_layouts`."""
    layouts = enumerate_layouts(model_cfg, n_devices, batch_size // grad_accum, seq_len, **enumerate_kw)
    preds = [predict(layout, model_cfg, n_params, hw, batch_size=batch_size, grad_accum=grad_accum,
                     seq_len=seq_len, state_bytes_fn=state_bytes_fn, layer_tensors=layer_tensors)
             for layout in layouts]
    fits = [p for p in preds if not too_big(p, hw.memory_bytes)]
    pruned = [p for p in preds if too_big(p, hw.memory_bytes)]
    return sorted(fits, key=lambda p: p.step_s), pruned


def rank_correlation(xs, ys) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 2 points or where
    either side has a single value (no order to correlate)."""
    if len(xs) < 2:
        return float("nan")

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def to_time(ranked: list, top: int, spread: int = 0) -> list:
    """The layouts to compile and time: the `top` best predicted, plus `spread` more spaced
    evenly over the rest of the ranking (they test the cost model across its range)."""
    rest = ranked[top:]
    picks = np.unique(np.linspace(0, len(rest) - 1, min(spread, len(rest))).round().astype(int)) if rest else []
    return ranked[:top] + [rest[i] for i in picks]


def choose(measured: dict[str, float]) -> str:
    """The winner among timed layouts: the fastest measured step (name -> seconds)."""
    return min(measured, key=measured.get)


# ---------------------------------------------------------------------------------------
# Measuring the machine (for `Hardware` on the machine at hand).

def _median_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _per_iteration(loop, x, min_seconds: float = 0.05) -> float:
    """Seconds per iteration of `loop(x, k)`, a jitted loop of k iterations compiled into one
    program: the slope between k and 2k iterations, k doubled until 2k take `min_seconds`,
    so the program's dispatch drops out and what is left is what the op costs inside a step."""
    k = 2
    while True:
        t_k, t_2k = _median_time(loop, x, k), _median_time(loop, x, 2 * k)
        if t_2k >= min_seconds or k >= 2 ** 16:
            return max(t_2k - t_k, 1e-9) / k
        k *= 2


def measure_matmul_flops(devices=None, shape=(512, 512, 512)) -> float:
    """FLOP/s per device of [m, k] @ [k, n] @ [n, k] matmul chains on every device at once;
    pass one device for its rate alone. `shape` = (m, k, n): e.g. (tokens per device,
    d_model, d_mlp), the model's own feed-forward matmul."""
    devices = list(jax.devices() if devices is None else devices)
    m, k, n = shape
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    x = jax.device_put(jnp.ones((len(devices), m, k), jnp.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    w1, w2 = jnp.full((k, n), 1 / k, jnp.float32), jnp.full((n, k), 1 / n, jnp.float32)

    loop = jax.jit(lambda a, iterations: jax.lax.fori_loop(0, iterations, lambda i, v: (v @ w1) @ w2, a))
    return 4 * m * k * n / _per_iteration(loop, x)


def measure_link(devices=None, sizes=(2 ** 10, 2 ** 20)) -> tuple[float, float]:
    """(bytes/s, latency s) per device of an all-reduce over all devices inside one compiled
    program, fitted to the ring time 2(g-1)/g · bytes / bandwidth + latency at two message
    sizes (float32)."""
    devices = list(jax.devices() if devices is None else devices)
    g = len(devices)
    if g == 1:
        return float("inf"), 0.0
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    spec = jax.sharding.PartitionSpec("d")

    def body(a, iterations):
        return jax.lax.fori_loop(0, iterations, lambda i, v: jax.lax.psum(v, "d") / g, a)

    loop = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec,
                                 check_vma=False))

    points = []
    for nbytes in sizes:
        x = jax.device_put(jnp.ones((g, nbytes // 4), jnp.float32), jax.sharding.NamedSharding(mesh, spec))
        points.append((2 * (g - 1) / g * nbytes, _per_iteration(loop, x)))
    (b0, t0), (b1, t1) = points
    bandwidth = (b1 - b0) / (t1 - t0) if t1 > t0 else b1 / t1  # noise: no latency seen
    return bandwidth, max(t0 - b0 / bandwidth, 0.0)


def measure_hardware(memory_bytes: float, mfu: float = 0.5, devices=None,
                     matmul_shape=(512, 512, 512)) -> Hardware:
    """`Hardware` of the devices at hand, measured in compiled loops: the matmul rate at
    `matmul_shape` with every device busy and with one device alone, and the all-reduce link."""
    devices = list(jax.devices() if devices is None else devices)
    bandwidth, latency = measure_link(devices)
    return Hardware(measure_matmul_flops(devices, matmul_shape), mfu, bandwidth, latency, memory_bytes,
                    solo_flops=measure_matmul_flops(devices[:1], matmul_shape))
