"""Pieces the ops' api.py and config.py files share (STYLE 2.2): input and config checks that raise
ValueError naming the value, the choice between the Triton kernels and the reference, and
logging each fallback reason once.
"""
import jax
import jax.numpy as jnp

FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def check_float_dtype(name: str, array) -> None:
    """Raise ValueError unless `array` (called `name` in the message) is float32, bfloat16 or float16."""
    if jnp.dtype(array.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} dtype={jnp.dtype(array.dtype).name} unsupported; use float32, bfloat16 or float16")


def check_backend(backend, backends: tuple[str, ...]) -> None:
    """Raise ValueError unless `backend` is one of `backends`."""
    if backend not in backends:
        raise ValueError(f"backend={backend!r} unknown; use one of {backends}")


def warn_once(log, warned: set[str], message: str) -> None:
    """log.warning(message) the first time `message` comes; `warned` holds those already logged."""
    if message not in warned:
        warned.add(message)
        log.warning(message)


def platform() -> str:
    """The platform the code is built for: "gpu" inside an abstract mesh of GPUs (lowering for a GPU
    from a host without one, as `pallas_kernels.triton_compile` does), else jax's default backend."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return "gpu" if abstract is not None and abstract.platform == "gpu" else jax.default_backend()


def triton_or_reference(backend: str, interpret: bool, warn) -> str:
    """Resolve "auto", "triton" or "reference" by where the Triton kernels run: on a GPU, or on any
    device with interpret=True. Without either, "auto" gives "reference" after warn(reason) and
    "triton" raises ValueError."""
    if backend == "reference":
        return "reference"
    if interpret or platform() == "gpu":
        return "triton"
    if backend == "triton":
        raise ValueError("backend='triton' needs a GPU; pass interpret=True to run it on CPU")
    warn(f"no GPU (default backend {jax.default_backend()!r}) and interpret=False")
    return "reference"


def check_launch_config(config, *, powers_of_2: tuple[str, ...], warps: tuple[str, ...]) -> None:
    """Raise ValueError unless the fields `powers_of_2` of a config dataclass are powers of 2 and
    its warp counts `warps` are at most 32; the message names the class, field and value."""
    kind = type(config).__name__
    for name in powers_of_2:
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{kind}.{name}={value} must be a power of 2")
    for name in warps:
        value = getattr(config, name)
        if value > 32:
            raise ValueError(f"{kind}.{name}={value} must be <= 32")


def targets_hopper() -> bool:
    """Whether the code is built for sm_90 (Hopper: wgmma, TMA, the Mosaic GPU kernels): the
    abstract mesh's GPU when one is set (lowering for a GPU from a host without one), else the
    first device."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return abstract.platform == "gpu" and any(h in abstract.device_kind for h in ("H100", "H200", "H800"))
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"
