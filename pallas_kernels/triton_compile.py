"""Compile the Pallas Triton kernels of a jitted function to Hopper machine code on any host, GPU or
not: whether each kernel compiles, and the registers, spills and shared memory it takes.

    from pallas_kernels.triton_compile import compile_triton_kernels
    for build in compile_triton_kernels(my_fn, *shape_dtype_structs):
        print(build)  # KernelBuild(name='matvec', num_warps=4, registers=62, spill_bytes=0, ...)

The function is lowered for an abstract H100, so the kernels called with backend "auto" or
"triton" take their Triton path as on the GPU; each Triton module in the lowered program is
compiled by the `triton` package's compiler (to PTX) and its `ptxas` (to SASS), which report the
resources. Needs the `triton` package (Linux x86-64; in the `dev` extra). On a GPU, XLA compiles
the same Triton IR with its own copy of Triton, so the figures match a GPU build up to the
difference between the two Triton versions. `loop_loads(build.sass)` reads the SASS's
scheduling bits: for each loop, how many of its global loads are waited for before it goes round
(a loop meant to keep loads in flight across steps wants none) and how many stay in flight
through its waits (loads that share a scoreboard are waited for together). Two limits: the kernels get
their heuristic configs (the autotune table is read only on a GPU), and model code that chooses
a kernel by `jax.default_backend()` (llmjax.ops, the decode loop) takes its CPU path here.
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
# An sm_90 SM (CUDA's occupancy rules): registers are given out 8 a thread at a time, and each
# block also holds 1 KB of shared memory the system reserves.
REGISTERS_PER_SM, REGISTER_UNIT = 65536, 8
SHARED_PER_SM, SHARED_PER_BLOCK, SHARED_RESERVED = 228 * 1024, 227 * 1024, 1024
THREADS_PER_SM, BLOCKS_PER_SM = 2048, 32


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
        """Blocks resident on one SM at once, by registers, shared memory, threads and the block
        cap; 0 means the launch cannot run."""
        threads = 32 * self.num_warps
        if self.shared_bytes > SHARED_PER_BLOCK:
            return 0
        registers = max(-(-self.registers // REGISTER_UNIT), 1) * REGISTER_UNIT
        return min(REGISTERS_PER_SM // (registers * threads), SHARED_PER_SM // (self.shared_bytes + SHARED_RESERVED),
                   THREADS_PER_SM // threads, BLOCKS_PER_SM)


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


def compile_module(module: dict) -> KernelBuild:
    """Compile one module from `triton_modules` to sm_90a SASS; raises what the compiler raises (a
    kernel that does not compile), or RuntimeError with ptxas's message."""
    import triton  # the dev extra's; imported here so the rest of the package never needs it
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"{module['name']}.ttir")  # Triton reads IR as text; the suffix says which
        with open(source, "w") as f:
            f.write(module["ir"])
        kernel = triton.compile(source, target=target,
                                options=dict(num_warps=module["num_warps"], num_stages=module["num_stages"]))
        ptx, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        # ptxas again, for its -v report (Triton runs it without -v and keeps no log).
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        report = _tool(os.path.join(tools, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o", cubin).stderr
        sass = _tool(os.path.join(tools, "cuobjdump"), "-sass", cubin).stdout

    def number(pattern):
        found = re.search(pattern, report)
        if found is None:
            raise RuntimeError(f"no {pattern!r} in ptxas's report for {module['name']}:\n{report}")
        return int(found.group(1))

    return KernelBuild(name=module["name"], num_warps=module["num_warps"], num_stages=module["num_stages"],
                       registers=number(r"Used (\d+) registers"),
                       spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                       stack_bytes=number(r"(\d+) bytes stack frame"), shared_bytes=kernel.metadata.shared,
                       sass=sass)


def _tool(*command):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{os.path.basename(command[0])} failed ({done.returncode}):\n{done.stderr}")
    return done


def compile_triton_kernels(fn, *args, **jit_kwargs) -> list[KernelBuild]:
    """Every Pallas Triton kernel of jax.jit(fn, **jit_kwargs)(*args) lowered for an H100, compiled
    to sm_90a SASS, in program order."""
    return [compile_module(m) for m in triton_modules(fn, *args, **jit_kwargs)]


# Reading the SASS: Volta and later encode an instruction in 128 bits whose top 23 carry its
# scheduling (bits 105-108 stall cycles, 109 yield, 110-112 the scoreboard a variable-latency
# result signals, 113-115 the one its source reads release, 116-121 the scoreboards it waits
# for, 122-125 operand reuse), as described by the published reverse-engineering of these
# encodings (Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking",
# and the assemblers built on it). A scoreboard is a count: waiting on one waits for every
# result still in flight on it.
NO_SCOREBOARD = 7


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    text: str  # e.g. "@!P4 LDG.E.128 R4, desc[UR8][R18.64]"
    writes: int | None  # the scoreboard its result signals (None: fixed latency)
    waits: frozenset  # the scoreboards it waits for before it issues


def sass_instructions(sass: str) -> list[Instruction]:
    """The instructions of cuobjdump -sass output, with their scoreboards."""
    lines = sass.splitlines()
    found = []
    for line, following in zip(lines, lines[1:]):
        head = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\* 0x[0-9a-f]{16} \*/", line)
        tail = re.fullmatch(r"\s*/\* (0x[0-9a-f]{16}) \*/", following)
        if head and tail:
            control = int(tail.group(1), 16) >> 41
            writes = (control >> 5) & 7
            found.append(Instruction(int(head.group(1), 16), head.group(2),
                                     None if writes == NO_SCOREBOARD else writes,
                                     frozenset(b for b in range(6) if control >> (11 + b) & 1)))
    return found


@dataclasses.dataclass(frozen=True)
class LoopLoads:
    """The loads matching a pattern inside one loop (a backward branch): where each is first
    waited for (later in the same pass: it cannot overlap the next pass), and how many of them
    may still be in flight once the loop's waits on their scoreboards clear (a plain wait lets
    none through, `DEPBAR.LE SBn, c` lets c; loads sharing a scoreboard drain together)."""
    start: int  # address of the loop's first instruction
    length: int  # instructions
    loads: int
    waited_same_pass: int
    in_flight_after_wait: int | None  # the fewest over the loop's waits; None: not waited in it
    innermost: bool  # no other loop with such loads inside it


def _waits(ins: Instruction) -> dict[int, int]:
    """Scoreboard -> how many of its operations may stay outstanding once `ins` may issue."""
    left = dict.fromkeys(ins.waits, 0)
    # DEPBAR.LE SBn, c[, {m,...}]: n down to c outstanding, each listed m down to 0 (any predicate)
    depbar = re.search(r"\bDEPBAR\.LE SB(\d), (0x[0-9a-f]+|\d+)(?:, \{([\d,]+)\})?", ins.text)
    if depbar:
        board = int(depbar.group(1))
        left[board] = min(left.get(board, 1 << 30), int(depbar.group(2), 0))
        left.update(dict.fromkeys((int(m) for m in (depbar.group(3) or "").split(",") if m), 0))
    return left


def _commits(ins: Instruction) -> bool:
    """LDGDEPBAR: the cp.async copies issued since the last one become a group on its scoreboard."""
    return re.search(r"\bLDGDEPBAR\b", ins.text) is not None


def _matching(body: list[Instruction], pattern: str) -> list[bool]:
    """Which instructions are the loads `pattern` names (never the LDGDEPBAR commits)."""
    return [re.search(pattern, ins.text) is not None and not _commits(ins) for ins in body]


PASSES = 8  # a software pipeline keeps its loads up to a few passes ahead


def _steady_pass(body: list[Instruction], matches: list[bool]) -> tuple[int, int | None]:
    """A loop's pass in its steady state (the last of PASSES run from nothing in flight): how many
    of its matching loads (`matches`, one flag an instruction) it waits for itself, and the fewest
    of them in flight right after a wait on one of their scoreboards. Each scoreboard is a queue
    of the operations that signal it, done in order. A matching load that signals none (an
    LDGSTS, cp.async) joins the group the next LDGDEPBAR commits, which is one operation on the
    scoreboard LDGDEPBAR signals."""
    grouped = any(match and ins.writes is None for ins, match in zip(body, matches))
    load_boards = {ins.writes for ins, match in zip(body, matches)
                   if ins.writes is not None and (match or grouped and _commits(ins))}
    waits = [_waits(ins) for ins in body]
    # Loads on a scoreboard the loop never waits on would pile up pass after pass: not counted.
    waited = load_boards & {board for wait in waits for board in wait}
    queues = {board: [] for board in range(6)}  # (matching loads it holds, issued in the last pass)
    uncommitted, same, fewest = 0, 0, None
    for last in [False] * (PASSES - 1) + [True]:
        for ins, match, wait in zip(body, matches, waits):
            for board, left in wait.items():
                queue = queues[board]
                cut = len(queue) - min(left, len(queue))
                done, queues[board] = queue[:cut], queue[cut:]
                if last and board in load_boards:
                    same += sum(loads for loads, now in done if now)
                    in_flight = uncommitted + sum(loads for w in waited for loads, _ in queues[w])
                    fewest = in_flight if fewest is None else min(fewest, in_flight)
            if ins.writes is None:
                uncommitted += match
            elif _commits(ins):
                queues[ins.writes].append((uncommitted, last))
                uncommitted = 0
            else:
                queues[ins.writes].append((int(match), last))
    return same, fewest


def loop_loads(sass: str, pattern: str = r"LDG\.E\.128 ") -> list[LoopLoads]:
    """For every loop of the kernel holding loads that match `pattern` (default plain 16-byte
    global loads into registers; "LDGSTS" for cp.async copies into shared memory), how many of
    them are waited for before the loop goes round, and how many stay in flight through its
    waits. A loop meant to keep loads in flight across its steps (software prefetch) wants none
    of the first and more than 0 of the second.
    A loop is a branch (BRA, with any modifier or predicate) to an earlier address."""
    code = sass_instructions(sass)
    index = {ins.address: i for i, ins in enumerate(code)}
    loops = []
    for end, ins in enumerate(code):
        branch = re.search(r"\bBRA(?:\.\w+)* (?:!?U?P\d, )?0x([0-9a-f]+)", ins.text)
        target = int(branch.group(1), 16) if branch else None
        if target is None or target >= ins.address or target not in index:
            continue
        body = code[index[target]:end + 1]
        matches = _matching(body, pattern)
        if any(matches):
            same, in_flight = _steady_pass(body, matches)
            loops.append((body[0].address, ins.address, len(body), sum(matches), same, in_flight))
    return [LoopLoads(start, length, loads, same, in_flight, innermost=not any(
        start <= other[0] and other[1] <= end and other[:2] != (start, end) for other in loops))
        for start, end, length, loads, same, in_flight in loops]
