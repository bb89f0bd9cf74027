"""One process of the multi-host test (tests/sharding/test_multihost.py), and the training
both sides run: a few fsdp steps of a tiny model on a global 8-device mesh.

Run as `python -m tests.sharding.multihost_worker OUT.npz` with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID and 4 CPU devices per process in the environment.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llmjax.config import MeshConfig, OptimConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.optimizer import make_optimizer
from llmjax.train.step import init_train_state, make_train_step
from sharding.distributed import initialize
from sharding.mesh import make_mesh

STEPS = 3
MODEL = ["preset=llama-tiny", "model.n_heads=8", "model.n_kv_heads=4", "model.d_mlp=256"]
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _global(x, sharding):
    """A global array from a host value every process holds in full."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def train() -> tuple[list[float], dict]:
    """(losses, params as host arrays) after STEPS fsdp steps on all of jax.devices()."""
    cfg = load_config(overrides=MODEL).model
    graphdef, params = split_model(init_model(cfg))  # seeded: the same on every process
    optimizer = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), total_steps=100)
    batch = np.asarray(jax.random.randint(jax.random.key(5), (2, 8, 17), 0, cfg.vocab_size, jnp.int32))
    state = init_train_state(params, optimizer)
    step = make_train_step(graphdef, optimizer, mesh=make_mesh(MeshConfig(fsdp=8, rules="fsdp")),
                           rules="fsdp")
    (state_sh, batch_sh), _ = step.shardings(state, batch)
    state, batch = jax.tree.map(_global, state, state_sh), _global(batch, batch_sh)
    compiled = step.lower(state, batch).compile(compiler_options=COMPILER_OPTIONS)
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # replicated: every process reads its own copy
    params = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                          state["params"])
    return losses, params


def main(out_path: str) -> None:
    assert initialize(MeshConfig()), "expected JAX_NUM_PROCESSES > 1 in the environment"
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    losses, params = train()
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out_path, losses=np.array(losses), **flat)


if __name__ == "__main__":
    main(sys.argv[1])
