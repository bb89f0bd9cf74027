"""Compile the Pallas Triton kernels of a jitted function to Hopper machine code on any host, GPU or
not: whether each kernel compiles, and the registers, spills and shared memory it takes.

    from pallas_kernels.triton_compile import compile_triton_kernels
    for build in compile_triton_kernels(my_fn, *shape_dtype_structs):
        print(build)  # KernelBuild(name='matvec', num_warps=4, registers=62, spill_bytes=0, ...)

The function is lowered for an abstract H100 (so the kernels pick their Triton path as on the GPU);
each Triton module in the lowered program is compiled by the `triton` package's compiler (to PTX)
and its `ptxas` (to SASS), which report the resources. Needs the `triton` package (Linux x86-64; in
the `dev` extra). On a GPU, XLA compiles the same Triton IR with its own copy of Triton, so the
figures match a GPU build up to the difference between the two Triton versions.
"""
import dataclasses
import os
import re
import subprocess
import tempfile

import jax
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as triton_dialect

TRITON_CALL = "__gpu$xla.gpu.triton"
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 227 * 1024  # the most one block may take on sm_90


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """One kernel's sm_90 build: its launch options and what ptxas reports."""
    name: str
    num_warps: int
    num_stages: int
    registers: int  # per thread
    spill_bytes: int  # spill stores + loads per thread
    stack_bytes: int
    shared_bytes: int  # dynamic shared memory Triton asks for
    sass: str = dataclasses.field(repr=False)

    @property
    def blocks_per_sm(self) -> int:
        """Blocks resident on one SM at once by registers and shared memory (warp and block caps
        aside); 0 means the launch cannot run."""
        by_registers = REGISTERS_PER_SM // (self.registers * 32 * self.num_warps)
        by_shared = SHARED_PER_SM // self.shared_bytes if self.shared_bytes else by_registers
        return min(by_registers, by_shared)


def triton_modules(fn, *args, device=H100, **jit_kwargs) -> list[dict]:
    """The Triton modules of jax.jit(fn, **jit_kwargs)(*args) lowered for `device`: dicts of name,
    num_warps, num_stages and ir (Triton IR as text). `args`: arrays or jax.ShapeDtypeStruct."""
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn, **jit_kwargs).trace(*args).lower(lowering_platforms=("cuda",))
    modules = []
    context = mlir.make_ir_context()  # the lowering holds each module as bytecode; read it back as text
    triton_dialect.register_dialect(context)

    def visit(op):
        if op.name == "stablehlo.custom_call" and ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL:
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])  # custom call API version 4
            modules.append(dict(name=ir.StringAttr(config["name"]).value,
                                num_warps=ir.IntegerAttr(config["num_warps"]).value,
                                num_stages=ir.IntegerAttr(config["num_stages"]).value,
                                ir=ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes, context=context)
                                .operation.get_asm(enable_debug_info=False)))
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    visit(inner.operation)

    visit(lowered.compiler_ir("stablehlo").operation)
    return modules


def compile_module(module: dict, *, capability: int = 90) -> KernelBuild:
    """Compile one module from `triton_modules` to SASS for sm_`capability`; raises what the
    compiler raises (a kernel that does not compile)."""
    import triton  # the dev extra's; imported here so the rest of the package never needs it
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", capability, 32)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"{module['name']}.ttir")  # Triton reads IR as text; the suffix says which
        with open(source, "w") as f:
            f.write(module["ir"])
        kernel = triton.compile(source, target=target,
                                options=dict(num_warps=module["num_warps"], num_stages=module["num_stages"]))
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        report = subprocess.run([os.path.join(tools, "ptxas"), "-v", f"--gpu-name={arch}", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout

    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return KernelBuild(name=module["name"], num_warps=module["num_warps"], num_stages=module["num_stages"],
                       registers=number(r"Used (\d+) registers"),
                       spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                       stack_bytes=number(r"(\d+) bytes stack frame"), shared_bytes=kernel.metadata.shared,
                       sass=sass)


def compile_triton_kernels(fn, *args, device=H100, capability: int = 90, **jit_kwargs) -> list[KernelBuild]:
    """Every Pallas Triton kernel of jax.jit(fn, **jit_kwargs)(*args), compiled for sm_`capability`,
    in program order."""
    return [compile_module(m, capability=capability) for m in triton_modules(fn, *args, device=device, **jit_kwargs)]
