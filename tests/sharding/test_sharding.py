"""Every rule preset trains like the unsharded twin, and lays params/opt state out as it promises.

8 CPU devices (conftest.py). Model sizes and meshes: tests/sharding/conftest.py.
"""
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmjax.config import MeshConfig, load_config
from llmjax.models import init_model, split_model
from llmjax.train.step import make_train_step
from sharding.axes import ACT_EMBED, BATCH, LENGTH, LOGICAL_AXES
from sharding.mesh import check_divisibility, make_mesh
from sharding.placement import (format_shardings, logical_to_spec, param_logical_names,
                                shard_batch, state_shardings)
from sharding.rules import PRESETS, get_rules, mesh_axes_of, validate_rules
from tests.sharding.conftest import FAMILIES, LAYOUTS

TOL = 1e-5  # DESIGN.md: sharded == unsharded within 1e-5 in fp32 after 3 steps

# ---------------------------------------------------------------------------------------
# Equivalence with the unsharded run.

CASES = [("llama", layout) for layout in LAYOUTS] + [("gpt2", "fsdp_tp")]


@pytest.mark.parametrize("family,layout", CASES)
def test_losses_and_params_equal_unsharded(runs, family, layout):
    ref, run = runs(family, None), runs(family, layout)
    np.testing.assert_allclose(run.losses, ref.losses, rtol=0, atol=TOL)
    assert ref.losses[-1] < ref.losses[0]  # the steps did something
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         run.state["params"], ref.state["params"])
    worst = max(jax.tree_util.tree_leaves_with_path(diffs), key=lambda kv: kv[1])
    assert worst[1] < TOL, f"{layout}: largest param difference {worst}"
    assert int(run.state["step"]) == 3


# ---------------------------------------------------------------------------------------
# The layouts each preset promises (llama: wq [L, D, N, H], wo [L, N, H, D],
# w_in [L, D, F], w_out [L, F, D], embed [V, D], lm_head [D, V], norm scale [L, D],
# final norm scale [D]).

_TP = {"wq": P(None, None, "tensor", None), "wk": P(None, None, "tensor", None),
       "wo": P(None, "tensor", None, None), "w_in": P(None, None, "tensor"),
       "w_out": P(None, "tensor", None), "embed": P("tensor", None), "lm_head": P(None, "tensor"),
       "scale": P(None, None)}
_FSDP = {"wq": P(None, "fsdp", None, None), "wk": P(None, "fsdp", None, None),
         "wo": P(None, None, None, "fsdp"), "w_in": P(None, "fsdp", None),
         "w_out": P(None, None, "fsdp"), "embed": P(None, "fsdp"), "lm_head": P("fsdp", None),
         "scale": P(None, "fsdp")}
_FSDP_TP = {"wq": P(None, "fsdp", "tensor", None), "wk": P(None, "fsdp", "tensor", None),
            "wo": P(None, "tensor", None, "fsdp"), "w_in": P(None, "fsdp", "tensor"),
            "w_out": P(None, "tensor", "fsdp"), "embed": P("tensor", "fsdp"),
            "lm_head": P("fsdp", "tensor"), "scale": P(None, "fsdp")}
for _table in (_TP, _FSDP, _FSDP_TP):  # wv is laid out like wk, w_gate like w_in
    _table.update(wv=_table["wk"], w_gate=_table["w_in"], final_scale=P(_table["scale"][1]))
_REPLICATED = {name: P(*[None] * len(spec)) for name, spec in _TP.items()}

# preset -> (params, optimizer state), by leaf name.
EXPECTED = {
    "dp": (_REPLICATED, _REPLICATED),
    "fsdp": (_FSDP, _FSDP),
    "zero1": (_REPLICATED, _FSDP),
    "tp": (_TP, _TP),
    "fsdp_tp": (_FSDP_TP, _FSDP_TP),
    "sp": (_TP, _TP),
    "cp": (_FSDP, _FSDP),
}


def _leaf_specs(tree):
    """{(path tuple): spec} of a tree of sharded arrays."""
    return {tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path):
            x.sharding.spec for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _normalized(spec, ndim):
    """jax drops trailing Nones from an array's spec; pad back to one entry per dim."""
    return P(*(list(spec) + [None] * (ndim - len(spec))))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_specs_are_what_the_preset_promises(runs, layout):
    run = runs("llama", layout)
    want_params, want_opt = EXPECTED[layout]
    params, opt_state = run.state["params"], run.state["opt_state"]
    mu = opt_state[1][0].mu  # chain(clip, adamw): adamw's scale_by_adam state
    for tree, want in ((params, want_params), (mu, want_opt), (opt_state[1][0].nu, want_opt)):
        for path, spec in _leaf_specs(tree).items():
            expected = want["final_scale" if path == ("final_norm", "scale") else path[-1]]
            assert _normalized(spec, len(expected)) == expected, (layout, path, spec)
    # The scalar optimizer counts and the step stay replicated.
    assert run.state["step"].sharding.spec == P()
    assert opt_state[1][0].count.sharding.spec == P()
    print(f"\n{layout}:\n" + format_shardings(run.state, jax.tree.map(lambda x: x.sharding, run.state)))


def test_fsdp_splits_every_param_8_ways(runs):
    run = runs("llama", "fsdp")
    for path, x in jax.tree_util.tree_leaves_with_path(run.state["params"]):
        shard = x.sharding.shard_shape(x.shape)
        assert np.prod(shard) * 8 == np.prod(x.shape), (path, x.shape, shard)


@pytest.mark.parametrize("layout,length_axis", [("sp", "tensor"), ("cp", "sequence"), ("tp", None)])
def test_residual_stream_split_along_length(runs, layout, length_axis):
    """sp/cp constrain the [B, T, D] block outputs along T; tp leaves T whole."""
    text = runs("llama", layout).lowered_text
    length = f'{{"{length_axis}"}}' if length_axis else "{}"
    pattern = re.escape(f'[{{"data", "fsdp"}}, {length}, {{}}]>') + r" : tensor<8x16x64xf32>"
    assert re.search(pattern, text), f"no [B, T, D] constraint with T over {length_axis}"


# ---------------------------------------------------------------------------------------
# The tables themselves (no compiling).

@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_covers_every_logical_name_once(preset):
    table = validate_rules(get_rules(preset))
    assert set(table) == set(LOGICAL_AXES) and len(get_rules(preset)) == len(LOGICAL_AXES)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_uses_each_mesh_axis_once_per_spec(family, preset):
    cfg = load_config(overrides=FAMILIES[family]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    names = param_logical_names(graphdef, nnx.to_pure_dict(params))
    names[("activation",)] = (BATCH, LENGTH, ACT_EMBED)  # the model's block-boundary constraint
    for path, dims in names.items():
        spec = logical_to_spec(dims, get_rules(preset))
        axes = [a for entry in spec for a in mesh_axes_of(entry)]
        assert len(axes) == len(set(axes)), (preset, path, spec)


def test_init_model_under_mesh_matches_state_shardings():
    """flax's eager sharding at creation and our placement agree on every param."""
    mesh_cfg = LAYOUTS["fsdp_tp"]
    mesh = make_mesh(mesh_cfg)
    cfg = load_config(overrides=FAMILIES["llama"]).model
    graphdef, params = split_model(init_model(cfg, mesh=mesh, rules=get_rules(mesh_cfg.rules)))
    want = state_shardings(graphdef, {"params": params}, mesh, mesh_cfg.rules)["params"]
    got = jax.tree.map(lambda x: _normalized(x.sharding.spec, x.ndim), params)
    assert got == jax.tree.map(lambda s, x: _normalized(s.spec, x.ndim), want, params)


# ---------------------------------------------------------------------------------------
# Bad configurations get errors that name the problem.

def test_mesh_product_must_equal_device_count():
    with pytest.raises(ValueError, match=r"mesh.data=2 mesh.fsdp=2 mesh.pipeline=1 mesh.expert=1 "
                                         r"mesh.sequence=1 mesh.tensor=1 has 4 slots .* 8 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2))


def test_make_mesh_axes_in_order():
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    assert mesh.axis_names == ("data", "fsdp", "pipeline", "expert", "sequence", "tensor")
    assert tuple(mesh.shape.values()) == (2, 1, 1, 1, 1, 4)
    sub = make_mesh(MeshConfig(fsdp=4), devices=jax.devices()[:4])
    assert sub.devices.size == 4


@pytest.mark.parametrize("mesh_cfg,batch,match", [
    (MeshConfig(tensor=8, rules="tp"), 8, r"model.n_kv_heads=4 is not divisible by mesh.tensor=8"),
    (MeshConfig(data=8, rules="dp"), 6, r"micro-batch size .*=6 is not divisible by mesh.data=8 x "
                                        r"mesh.fsdp=1 = 8"),
    (MeshConfig(data=2, sequence=4, rules="cp"), 8, r"data.seq_len=18 is not divisible by mesh.sequence=4"),
    (MeshConfig(data=2, tensor=4, rules="dp"), 8, r"rules 'dp' split nothing over mesh.tensor=4"),
    (MeshConfig(data=2, pipeline=4, rules="dp"), 8, r"model.n_layers=2 is not divisible by mesh.pipeline=4"),
])
def test_check_divisibility_names_the_key(mesh_cfg, batch, match):
    cfg = load_config(overrides=FAMILIES["llama"]).model
    with pytest.raises(ValueError, match=match):
        check_divisibility(cfg, mesh_cfg, batch, seq_len=18)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ValueError, match=r"mesh.rules='fsdpp' .*\(did you mean 'fsdp'\?\)"):
        get_rules("fsdpp")
    with pytest.raises(ValueError, match=r"mesh.rules='pp' .*ep; for pipeline stages, keep a preset and set "
                                         r"mesh.pipeline > 1"):
        get_rules("pp")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t[:-1], r"no row for logical name\(s\) act_vocab"),
    (lambda t: t + (("embed", "tensor"),), r"'embed' has two rows"),
    (lambda t: t[:1] + (("heads", "model"),) + t[2:], r"unknown mesh axis 'model'"),
    (lambda t: t + (("emebd", None),), r"'emebd' is unknown.*did you mean 'embed'"),
    (lambda t: (("embed", ("fsdp", "fsdp")),) + t[1:], r"repeats a mesh axis"),
])
def test_invalid_tables_are_rejected(edit, match):
    table = get_rules("dp")
    assert table[0][0] == "embed" and table[1][0] == "heads" and table[-1][0] == "act_vocab"
    with pytest.raises(ValueError, match=match):
        validate_rules(edit(table))


def test_indivisible_param_names_its_path():
    mesh = make_mesh(MeshConfig(tensor=8))
    cfg = load_config(overrides=FAMILIES["llama"]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    with pytest.raises(ValueError, match=r"blocks/attn/wk .*kv_heads=4\) is split over tensor of size 8"):
        state_shardings(graphdef, {"params": nnx.to_pure_dict(params)}, mesh, "tp")


def test_mesh_without_the_rules_axes_is_rejected():
    cfg = load_config(overrides=FAMILIES["llama"]).model
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))
    mesh = jax.make_mesh((8,), ("x",))
    with pytest.raises(ValueError, match=r"the rules use mesh axis 'fsdp', but the mesh has axes \('x',\)"):
        state_shardings(graphdef, {"params": nnx.to_pure_dict(params)}, mesh, "fsdp")


def test_spec_errors():
    with pytest.raises(ValueError, match=r"is not a string"):
        logical_to_spec(("embed", object), get_rules("tp"))
    with pytest.raises(ValueError, match=r"mesh axis 'tensor' would shard two dims"):
        logical_to_spec(("heads", "mlp"), get_rules("tp"))
    with pytest.raises(ValueError, match=r"micro-batch size 6 is not divisible by the 8 devices"):
        shard_batch(np.zeros((1, 6, 17), np.int32), make_mesh(MeshConfig(data=8)), "dp")


def test_train_step_needs_mesh_and_rules_together():
    cfg = load_config(overrides=FAMILIES["llama"]).model
    graphdef = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))[0]
    with pytest.raises(ValueError, match=r"pass mesh and rules together"):
        make_train_step(graphdef, None, mesh=make_mesh(MeshConfig(data=8)))
    with pytest.raises(ValueError, match=r"not a rule preset"):
        make_train_step(graphdef, None, mesh=make_mesh(MeshConfig(data=8)), rules="zero3")


def test_shard_batch_splits_the_micro_batch_axis():
    batch = shard_batch(np.zeros((2, 8, 17), np.int32), make_mesh(LAYOUTS["fsdp_tp"]), "fsdp_tp")
    assert batch.sharding.spec == P(None, ("data", "fsdp"), None)
    assert batch.sharding.shard_shape(batch.shape) == (2, 4, 17)
