"""Shared set-ups for the sharding tests: one compiled train step per (family, layout).

Compiling is the cost on CPU, so each layout is compiled once per session (with LLVM's
expensive passes off, which halves compile time and leaves results alike within fp32
rounding) and its losses, final state and compiled program are shared by the
equivalence, sharding-spec and memory tests.
"""
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from llmjax.config import MeshConfig, OptimConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from sharding.mesh import check_divisibility, make_mesh
from sharding.placement import shard_state

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEPS = 3
GRAD_ACCUM, MICRO_BATCH, SEQ_LEN = 2, 8, 16

# Sizes divisible by every mesh below: heads 8, kv_heads 4, mlp 256, vocab 512, d_model 64.
FAMILIES = {
    "llama": ["preset=llama-tiny", "model.n_heads=8", "model.n_kv_heads=4", "model.d_mlp=256"],
    "gpt2": ["preset=gpt2-tiny"],
}

# One mesh per preset on the 8 CPU devices.
LAYOUTS = {
    "dp": MeshConfig(data=8, rules="dp"),
    "fsdp": MeshConfig(fsdp=8, rules="fsdp"),
    "zero1": MeshConfig(fsdp=8, rules="zero1"),
    "tp": MeshConfig(data=2, tensor=4, rules="tp"),
    "fsdp_tp": MeshConfig(fsdp=2, tensor=4, rules="fsdp_tp"),
    "sp": MeshConfig(data=2, tensor=4, rules="sp"),
    "cp": MeshConfig(fsdp=2, sequence=4, rules="cp"),
}


@dataclasses.dataclass
class Run:
    """The outcome of STEPS train steps of one layout (mesh None: the unsharded twin)."""

    losses: list
    state: dict
    compiled: object
    lowered_text: str
    mesh: object
    graphdef: object
    abstract_state: dict
    batch: jax.Array


def _setup(family):
    cfg = load_config(overrides=FAMILIES[family]).model
    graphdef, params = split_model(init_model(cfg))
    optimizer = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), total_steps=100)
    batch = jax.random.randint(jax.random.key(7), (GRAD_ACCUM, MICRO_BATCH, SEQ_LEN + 1), 0,
                               cfg.vocab_size, dtype=jnp.int32)
    return cfg, graphdef, params, optimizer, batch


def _run(family, layout):
    cfg, graphdef, params, optimizer, batch = _setup(family)
    state = init_train_state(jax.tree.map(jnp.array, params), optimizer)  # a copy: donated
    abstract = jax.eval_shape(lambda: state)
    if layout is None:
        mesh, step = None, make_train_step(graphdef, optimizer)
    else:
        mesh_cfg = LAYOUTS[layout]
        check_divisibility(cfg, mesh_cfg, MICRO_BATCH, seq_len=SEQ_LEN)
        mesh = make_mesh(mesh_cfg)
        step = make_train_step(graphdef, optimizer, mesh=mesh, rules=mesh_cfg.rules)
        state = shard_state(state, graphdef, mesh, mesh_cfg.rules)
    lowered = step.lower(state, batch)
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return Run(losses, state, compiled, lowered.as_text(), mesh, graphdef, abstract, batch)


@pytest.fixture(scope="session")
def runs():
    """runs(family, layout) -> Run, computed once per session; layout None is unsharded."""
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            cache[(family, layout)] = _run(family, layout)
        return cache[(family, layout)]

    return get
