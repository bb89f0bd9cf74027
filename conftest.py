"""Test set-up for tests/ and pallas_kernels/: eight CPU devices (sharded-vs-unsharded checks), gpu skips."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share one GPU: allocate as needed
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import tempfile  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS: jax reads it on first backend use)
import pytest  # noqa: E402

# Tests compile the same small programs many times (fresh closures per run); XLA's persistent
# cache turns the repeats into disk reads.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "llmjax-test-xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
