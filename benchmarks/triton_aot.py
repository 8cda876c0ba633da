"""Compile the NRPM Triton kernels for a GPU architecture ahead of time, on a machine without a GPU.

Triton's compiler and the ``ptxas``/``cuobjdump`` it ships need no driver, so the exact machine
code a GPU would run can be built and read here:

* :func:`compile_kernel` builds one kernel variant (forward or backward, dtype, norm, tile) for
  ``sm_<arch>`` (default 90, Hopper: H100/H200) and returns Triton's compiled kernel;
* :func:`kernel_report` reads its SASS: registers, spilled bytes, shared memory, and the innermost
  loop (the d loop that forms the product terms): its instruction count and mix, divided by the
  terms one thread handles per trip, i.e. **SASS instructions per term** (the kernels are bound
  by instruction issue, so this is the number that decides their speed);
* :func:`issue_bound_seconds` turns that into a lower bound of the run time: terms × instructions
  per term / (SMs × 4 schedulers × 32 lanes × clock); :func:`reciprocal_bound_seconds` does the
  same for the reciprocals (16 per SM per clock).

This is a static estimate, not a measurement: memory stalls, occupancy and atomics are not in it.
``benchmarks/nrpm_kernels.py --gpu-compile`` prints the report for the benchmark's cases;
tests/nn/test_nrpm_triton.py checks that every variant compiles for sm_90 without spills.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field

import torch

from robust_surgery.errors import InvalidInputError
from robust_surgery.nn.backends import triton as triton_kernels
from robust_surgery.nn.functional import NORM_CODES

_TRITON_DTYPES = {torch.float32: "fp32", torch.float64: "fp64"}
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?\s*([^;]*);")

# H200 SXM (the device tool's machine): 132 SMs at a boost clock of 1.98 GHz, 4 schedulers per SM,
# each issuing one warp instruction (32 lanes) per clock; 16 special-function results (MUFU:
# reciprocals) per SM per clock.
H200 = {"sms": 132, "clock_hz": 1.98e9, "schedulers": 4, "mufu_per_clock": 16}


@dataclass
class KernelReport:
    """Static facts of one compiled kernel variant (counts per thread unless said otherwise)."""

    name: str
    arch: int
    tile: tuple[int, int, int, int]  # (BR, BO, UNROLL, num_warps)
    registers: int
    stack_bytes: int  # stack frame per thread (local memory: spilled values live there)
    spill_bytes: int  # bytes ptxas spills per thread
    shared_bytes: int
    loop_instructions: int  # SASS instructions in one trip of the innermost loop
    terms_per_trip: float  # product terms one thread handles per trip
    loop_mix: dict[str, int] = field(default_factory=dict)  # opcode -> count within the loop

    @property
    def instructions_per_term(self) -> float:
        """SASS instructions one thread issues per product term in the innermost loop."""
        return self.loop_instructions / self.terms_per_trip


def _toolchain_binary(name: str) -> str:
    """Path of a binary Triton's NVIDIA backend ships (ptxas, cuobjdump)."""
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's NVIDIA backend has no {name} at {path}; reinstall triton")
    return path


def compile_kernel(backward: bool, dtype: torch.dtype = torch.float32, norm: str = "L1", arch: int = 90,
                   tile: tuple[int, int, int, int] | None = None, keep: bool = True,
                   need_x: bool = True, need_w: bool = True, aligned: bool = True):
    """Compile the forward or backward NRPM kernel for ``sm_<arch>`` without a GPU.

    The arguments are specialised as Triton does at launch for a contiguous problem: pointers
    16-byte aligned, integers 32-bit, the unit stride along D a constant, and (``aligned``) the
    sizes and strides multiples of 16 (784, 576 = 64·3·3, 256, …). ``tile`` defaults to
    :func:`triton_kernels.tile_sizes` for a large problem. Returns Triton's CompiledKernel (its
    ``asm`` holds the PTX and cubin).
    """
    if not triton_kernels.available():
        raise RuntimeError("Triton is not installed: pip install triton (it comes with torch on Linux)")
    if triton_kernels.interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted and cannot be compiled; unset it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in _TRITON_DTYPES:
        raise InvalidInputError(f"dtype {dtype} is not supported by the kernels; use torch.float32 or torch.float64")
    fn = triton_kernels._irls_bwd_kernel if backward else triton_kernels._irls_fwd_kernel
    br, bo, unroll, warps = tile or triton_kernels.tile_sizes(4096, 4096, dtype, backward)
    flags = {"NEED_X": need_x, "NEED_W": need_w} if backward else {"KEEP": keep}
    constants = {"NORM": NORM_CODES[norm], "BR": br, "BO": bo, "UNROLL": unroll, "sxd": 1, "swd": 1,
                 "FAST": dtype == torch.float32, **flags}
    ptr = "*" + _TRITON_DTYPES[dtype]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = ptr if name.endswith("_ptr") else "i32"
        if name.endswith("_ptr") or (aligned and name != "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def _sass_and_usage(kernel) -> tuple[str, str]:
    """(SASS listing of the kernel's cubin, ``ptxas -v`` report of its PTX)."""
    import tempfile

    arch = f"sm_{kernel.metadata.target.arch}" + ("a" if kernel.metadata.target.arch >= 90 else "")
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "kernel.cubin"), os.path.join(tmp, "kernel.ptx")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        sass = subprocess.run([_toolchain_binary("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_toolchain_binary("ptxas"), "-v", f"--gpu-name={arch}", ptx, "-o",
                                os.path.join(tmp, "check.cubin")], capture_output=True, text=True, check=True)
    return sass, usage.stdout + usage.stderr


def innermost_loop(sass: str) -> list[tuple[int, str]]:
    """The (address, opcode) list of the hot loop of a SASS listing: the longest innermost loop.

    Loops are the spans of backward branches; innermost ones contain no other backward branch.
    An unrolled loop (``tl.range(..., loop_unroll_factor=n)``) compiles to its unrolled body and
    a shorter remainder loop; the longest innermost loop is the unrolled body.
    """
    code = [(int(m.group(1), 16), m.group(3), m.group(5)) for m in _INSTRUCTION.finditer(sass)]
    loops = []
    for addr, op, args in code:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    if not inner:
        raise InvalidInputError("no loop in this SASS listing")
    start, end = max(inner, key=lambda span: span[1] - span[0])
    return [(a, op) for a, op, _ in code if start <= a <= end]


def kernel_report(kernel, tile: tuple[int, int, int, int]) -> KernelReport:
    """Registers, spills, shared memory and the innermost loop's cost of a compiled kernel."""
    sass, usage = _sass_and_usage(kernel)
    reg = re.search(r"Used (\d+) registers", usage)
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", usage)
    loop = innermost_loop(sass)
    br, bo, unroll, warps = tile
    terms = br * bo * unroll / (32 * warps)
    return KernelReport(name=kernel.metadata.name, arch=kernel.metadata.target.arch, tile=tile,
                        registers=int(reg.group(1)), stack_bytes=int(stack.group(1)),
                        spill_bytes=int(stack.group(2)), shared_bytes=kernel.metadata.shared,
                        loop_instructions=len(loop),
                        terms_per_trip=terms, loop_mix=dict(Counter(op for _, op in loop).most_common()))


def report(backward: bool, dtype: torch.dtype = torch.float32, norm: str = "L1", arch: int = 90,
           tile: tuple[int, int, int, int] | None = None) -> KernelReport:
    """Compile one variant (:func:`compile_kernel`) and read its :func:`kernel_report`."""
    tile = tile or triton_kernels.tile_sizes(4096, 4096, dtype, backward)
    return kernel_report(compile_kernel(backward, dtype, norm, arch, tile), tile)


def issue_bound_seconds(terms: float, instructions_per_term: float, machine: dict = H200) -> float:
    """Lower bound of a kernel's time (s) from instruction issue alone: every scheduler busy every clock."""
    per_second = machine["sms"] * machine["schedulers"] * 32 * machine["clock_hz"]
    return terms * instructions_per_term / per_second


def reciprocal_bound_seconds(terms: float, mufu_per_term: float, machine: dict = H200) -> float:
    """Lower bound of a kernel's time (s) from the special-function units (MUFU) alone."""
    return terms * mufu_per_term / (machine["sms"] * machine["mufu_per_clock"] * machine["clock_hz"])
