"""The memory model against the compiled train step, and its closed forms."""
import math

import numpy as np
import pytest

from sharding.memory import (activation_bytes_per_layer, estimate_train_memory, zero_bytes_per_param,
                             zero_formula)
from sharding.placement import batch_sharding
from tests.sharding.conftest import LAYOUTS


def _predicted(run, layout):
    return estimate_train_memory(run.graphdef, run.abstract_state, run.mesh, LAYOUTS[layout].rules)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_params_and_opt_state_match_memory_analysis(runs, layout):
    """The step's arguments per device are the state plus the batch shard (within 10%)."""
    run = runs("llama", layout)
    predicted = _predicted(run, layout)
    batch_shard = batch_sharding(run.mesh, LAYOUTS[layout].rules).shard_shape(run.batch.shape)
    batch_bytes = math.prod(batch_shard) * run.batch.dtype.itemsize
    compiled = run.compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    assert abs(predicted.params_and_opt - compiled) <= 0.1 * compiled, (layout, predicted, compiled)


def test_zero_stages_fall_out_of_the_presets(runs):
    dp, fsdp, zero1 = (_predicted(runs("llama", name), name) for name in ("dp", "fsdp", "zero1"))
    assert fsdp.params * 8 == dp.params and fsdp.grads * 8 == dp.grads  # ZeRO-3: all split
    assert zero1.params == dp.params and zero1.grads == dp.grads  # ZeRO-1: params, grads whole
    counts = 2 * 4 + 4  # two int32 optimizer counts and the step, replicated
    assert (zero1.opt_state - counts) * 8 == dp.opt_state - counts == 2 * dp.params  # Adam: mu, nu


def test_zero_closed_forms():
    psi, n = 7e9, 64
    assert zero_bytes_per_param(0, n) * psi == 16 * psi
    assert zero_bytes_per_param(1, n) == pytest.approx(4 + 12 / n)
    assert zero_bytes_per_param(2, n) == pytest.approx(2 + 14 / n)
    assert zero_bytes_per_param(3, n) == pytest.approx(16 / n)
    assert zero_formula(3) == "(2+2+12)Ψ/N"
    # fp32 params, grads and Adam moments: 4 + 4 + 8 bytes.
    assert zero_bytes_per_param(3, 8, param_bytes=4, grad_bytes=4, opt_bytes=8) == 2
    with pytest.raises(ValueError, match="stage=4"):
        zero_bytes_per_param(4, 8)


def test_activation_closed_form():
    b, t, d, a = 4, 2048, 4096, 32
    full = activation_bytes_per_layer(b, t, d, a, flash=False)
    assert full == t * b * d * (34 + 5 * a * t / d)  # Korthikanti et al. 2022, table 2
    tp = activation_bytes_per_layer(b, t, d, a, tensor=8, flash=False)
    sp = activation_bytes_per_layer(b, t, d, a, tensor=8, sequence_parallel=True, flash=False)
    assert np.isclose(sp * 8, full) and sp < tp < full
    assert activation_bytes_per_layer(b, t, d, a, recompute=True) == 2 * t * b * d
