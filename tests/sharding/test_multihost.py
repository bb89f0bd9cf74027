"""Multi-host: 2 processes x 4 CPU devices (gloo collectives) train like 1 process x 8 devices."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from llmjax.config import MeshConfig
from sharding.distributed import initialize, process_settings
from tests.sharding.multihost_worker import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # a hang guard: the two processes normally finish in under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    out = tmp_path / "losses_params.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multihost_worker", str(out)],
                              env={**env, "JAX_PROCESS_ID": str(i)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{logs[i][-3000:]}"

    losses, params = train()  # this process: 8 local devices
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses, rtol=0, atol=1e-6)
    assert losses[-1] < losses[0]
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], x, rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def test_one_process_is_a_no_op():
    assert initialize(MeshConfig(), environ={}) is False
    assert initialize(MeshConfig(), environ={"JAX_NUM_PROCESSES": "1"}) is False


def test_config_wins_over_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert process_settings(MeshConfig(), environ) == ("env:1", 4, 3)
    cfg = MeshConfig(coordinator="cfg:2", num_processes=2, process_id=1)
    assert process_settings(cfg, environ) == ("cfg:2", 2, 1)


@pytest.mark.parametrize("environ,match", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, r"mesh.num_processes=2 needs a coordinator"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, r"mesh.process_id=None .* in \[0, 2\)"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "2"},
     r"mesh.process_id=2 .* in \[0, 2\)"),
    ({"JAX_NUM_PROCESSES": "two"}, r"JAX_NUM_PROCESSES='two' must be an integer"),
])
def test_bad_multi_process_settings(environ, match):
    with pytest.raises(ValueError, match=match):
        initialize(MeshConfig(), environ=environ)
