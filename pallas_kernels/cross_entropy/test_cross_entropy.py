"""Contract test for the fused cross-entropy: every backend against the fp32 reference, plus memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _testing
from pallas_kernels.cross_entropy import api, cases, reference

BACKENDS = ["reference", "chunked", "triton"]  # triton: interpreted on a CPU
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _inputs(case, dtype):
    rng = np.random.default_rng(_testing.seed(case.name))

    def draw(what, shape, *scale_shift):
        return _testing.normal(f"{case.name}/{what}", shape, *scale_shift)

    hidden = jnp.asarray(draw("hidden", (*case.lead, case.d_model)), dtype)
    # Scale so that logits have O(1) spread: softmax neither uniform nor one-hot.
    weight = jnp.asarray(draw("weight", (case.vocab, case.d_model), 2 / case.d_model ** 0.5), dtype)
    labels = rng.integers(0, case.vocab, case.lead)
    labels[rng.random(case.lead) < case.ignore_fraction] = -100
    shape = case.lead if case.reduction == "none" else ()
    cotangent = jnp.asarray(draw("cotangent", shape, 1.0, 0.0 if shape else 1.5), jnp.float32)
    return hidden, weight, jnp.asarray(labels, jnp.int32), cotangent


def _loss_and_vjp(f, hidden, weight, labels, cotangent):
    def run(hidden, weight, labels, cotangent):
        loss, vjp = jax.vjp(lambda h, w: f(h, w, labels), hidden, weight)
        return loss, vjp(cotangent)
    return jax.jit(run)(hidden, weight, labels, cotangent)


@functools.cache
def _reference_result(case, dtype):
    """fp32 reference loss and VJP on the case's (rounded) inputs; shared by the backends' tests."""
    hidden, weight, labels, cotangent = _inputs(case, dtype)
    ref = lambda h, w, l: reference.cross_entropy(h, w, l, z_loss=case.z_loss,  # noqa: E731
                                                  reduction=case.reduction)
    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    return _loss_and_vjp(ref, up(hidden), up(weight), labels, cotangent)


def _check(case, dtype, backend):
    hidden, weight, labels, cotangent = _inputs(case, dtype)
    options = dict(z_loss=case.z_loss, reduction=case.reduction)
    interpret = backend == "triton" and jax.default_backend() != "gpu"

    def ours(h, w, l):
        return api.cross_entropy(h, w, l, chunk_size=case.chunk_size, backend=backend, interpret=interpret,
                                 **options)
    loss, (dhidden, dweight) = _loss_and_vjp(ours, hidden, weight, labels, cotangent)
    loss_ref, (dhidden_ref, dweight_ref) = _reference_result(case, dtype)
    assert loss.dtype == jnp.float32 and loss.shape == (case.lead if case.reduction == "none" else ())
    assert dhidden.dtype == dtype and dweight.dtype == dtype
    _testing.assert_close(loss, loss_ref, dtype, f"{case.name} loss")
    _testing.assert_close(dhidden, dhidden_ref, dtype, f"{case.name} dhidden")
    _testing.assert_close(dweight, dweight_ref, dtype, f"{case.name} dweight")


@pytest.mark.parametrize("backend,dtype", _testing.backend_dtype_params(BACKENDS, DTYPES))
@pytest.mark.parametrize("case", cases.CPU_CASES, ids=lambda c: c.name)
def test_matches_reference(case, dtype, backend):
    _check(case, dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", cases.GPU_CASES, ids=lambda c: c.name)
def test_matches_reference_gpu(case, dtype, backend):
    _check(case, dtype, backend)


def test_ignored_tokens_are_excluded_from_the_mean():
    case = cases.CrossEntropyCase("ignore_mean", (12,), vocab=300, d_model=32, chunk_size=5)
    hidden, weight, labels, _ = _inputs(case, jnp.float32)
    labels = labels.at[jnp.array([0, 5, 6, 11])].set(-100)
    loss_fn = jax.jit(lambda h, w, l: api.cross_entropy(h, w, l, chunk_size=5))
    loss, dhidden = jax.jit(jax.value_and_grad(loss_fn))(hidden, weight, labels)
    per_token = jax.jit(functools.partial(reference.cross_entropy, reduction="none"))(hidden, weight, labels)
    np.testing.assert_allclose(float(loss), float(per_token.sum()) / 8, rtol=1e-6)
    assert np.all(np.asarray(dhidden)[[0, 5, 6, 11]] == 0)
    # Changing an ignored token's hidden state changes nothing.
    moved = np.asarray(hidden).copy()
    moved[5] += 3.0
    assert float(loss_fn(jnp.asarray(moved), weight, labels)) == float(loss)


def test_all_ignored_gives_zero_loss_and_gradients():
    hidden = jnp.asarray(_testing.normal("all_ignored/h", (6, 32)), jnp.float32)
    weight = jnp.asarray(_testing.normal("all_ignored/w", (100, 32)), jnp.float32)
    labels = jnp.full((6,), -100)
    loss_fn = lambda h, w: api.cross_entropy(h, w, labels, chunk_size=4)  # noqa: E731
    loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(hidden, weight)
    assert float(loss) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)


def test_z_loss_adds_the_squared_log_normalizer():
    case = cases.CrossEntropyCase("zloss", (9,), vocab=500, d_model=32, chunk_size=4)
    hidden, weight, labels, _ = _inputs(case, jnp.float32)
    logits = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64).T
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss_fn = functools.partial(api.cross_entropy, chunk_size=4, reduction="sum")
    plain, with_z = jax.jit(lambda *a: (loss_fn(*a), loss_fn(*a, z_loss=0.01)))(hidden, weight, labels)
    np.testing.assert_allclose(float(with_z) - float(plain), 0.01 * np.sum(lse ** 2), rtol=1e-4)


def test_chunked_temporaries_stay_far_below_the_logits():
    """Compiled temp memory of loss + grads: chunked << tokens * vocab * 4 bytes; the reference is above."""
    tokens, vocab, d_model, chunk = 2048, 8192, 64, 256
    args = (jax.ShapeDtypeStruct((tokens, d_model), jnp.bfloat16),
            jax.ShapeDtypeStruct((vocab, d_model), jnp.bfloat16),
            jax.ShapeDtypeStruct((tokens,), jnp.int32))

    def temp_bytes(backend):
        f = lambda h, w, l: api.cross_entropy(h, w, l, chunk_size=chunk, backend=backend)  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = tokens * vocab * 4
    chunked_bytes, reference_bytes = temp_bytes("chunked"), temp_bytes("reference")
    assert reference_bytes >= logits_bytes  # the check can see a materialized [tokens, vocab] fp32
    # One chunk's fp32 logits is logits_bytes / 8; allow a few chunk-sized temporaries.
    assert chunked_bytes < logits_bytes / 2, (chunked_bytes, logits_bytes)


def _bad(**overrides):
    args = dict(hidden=jnp.ones((4, 8)), vocab_weight=jnp.ones((16, 8)), labels=jnp.zeros((4,), jnp.int32))
    args.update({k: v for k, v in overrides.items() if k in args})
    kwargs = {k: v for k, v in overrides.items() if k not in args}
    return lambda: api.cross_entropy(args["hidden"], args["vocab_weight"], args["labels"], **kwargs)


def test_reference_is_the_float64_formula():
    """The reference against lse - logit[label] + z lse^2 in float64 numpy, mean over the tokens
    whose label is not ignored."""
    h, w = _testing.normal("reference/h", (2, 9, 48)), _testing.normal("reference/w", (301, 48), 0.3)
    labels = np.random.default_rng(0).integers(0, 301, (2, 9))
    labels[0, :4] = -100
    logits = h.astype(np.float64) @ w.astype(np.float64).T
    m = logits.max(axis=-1)
    lse = m + np.log(np.exp(logits - m[..., None]).sum(axis=-1))
    label_logit = np.take_along_axis(logits, np.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    per_token = np.where(labels != -100, lse - label_logit + 1e-3 * lse ** 2, 0.0)
    ours = reference.cross_entropy(jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels), z_loss=1e-3)
    np.testing.assert_allclose(float(ours), per_token.sum() / (labels != -100).sum(), rtol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden=jnp.ones((4, 8), jnp.int32)), "hidden dtype=int32"),
    (dict(vocab_weight=jnp.ones((8, 16))), r"vocab_weight shape=\(8, 16\)"),
    (dict(vocab_weight=jnp.ones((16, 8), jnp.bfloat16)), "vocab_weight dtype=bfloat16"),
    (dict(labels=jnp.zeros((5,), jnp.int32)), r"labels shape=\(5,\)"),
    (dict(labels=jnp.zeros((4,), jnp.float32)), "dtype=float32"),
    (dict(z_loss=-0.1), "z_loss=-0.1"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(reduction="avg"), "reduction='avg'"),
    (dict(backend="triton"), "backend='triton'"),
])
def test_bad_input_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        _bad(**overrides)()


def test_auto_keeps_xla_fusions_under_a_partitioning_mesh():
    """"auto" (here in interpret mode, which stands in for a GPU) takes the Pallas chunk kernel,
    except under a mesh of several devices that XLA partitions: a pallas_call has no
    partitioning rule, so there each chunk's softmax stays in XLA fusions."""
    hidden, weight = jnp.ones((16, 8)), jnp.ones((32, 8))
    labels = jnp.zeros((16,), jnp.int32)

    def uses_kernel():
        jaxpr = jax.make_jaxpr(lambda h, w: api.cross_entropy(h, w, labels, interpret=True))(hidden, weight)
        return "pallas_call" in str(jaxpr)

    assert uses_kernel()
    with jax.set_mesh(jax.make_mesh((len(jax.devices()),), ("data",))):
        assert uses_kernel() == (len(jax.devices()) == 1)
