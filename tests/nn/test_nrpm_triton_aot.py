"""The Triton NRPM kernels compile for Hopper (sm_90) without a GPU, with the code we expect.

The interpreter checks of tests/nn/test_nrpm_triton.py run the kernels' arithmetic but not the
compiler: these tests build the real machine code (Triton's compiler, ptxas and cuobjdump need no
driver) and read it. They catch what only compilation shows: a construct the compiler rejects,
register spills, and a hot loop that lost its single reciprocal per term.
"""
from __future__ import annotations

import pytest
import torch

from robust_surgery.nn.backends import triton as tk

pytestmark = pytest.mark.skipif(not tk.available() or tk.interpreted(),
                                reason="needs Triton, not in interpreter mode")

NORMS = ("L1", "MCP", "Huber", "HM")


@pytest.fixture(scope="module")
def aot():
    """The ahead-of-time analysis tool: benchmarks/triton_aot.py (a tool, not part of the runtime)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "triton_aot.py"
    spec = importlib.util.spec_from_file_location("triton_aot", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_aot"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("norm", NORMS)
def test_float32_kernels_compile_for_sm90_without_spills(aot, norm, backward):
    r = aot.report(backward, torch.float32, norm)
    assert r.arch == 90 and r.tile == tk.tile_sizes(4096, 4096, torch.float32, backward)
    assert r.spill_bytes == 0 and r.stack_bytes == 0
    assert r.registers <= 255
    # the hot loop makes exactly one reciprocal (MUFU.RCP) per product term: the approximate
    # reciprocal, not a division with its range checks
    assert r.loop_mix["MUFU"] == r.terms_per_trip
    if not backward:
        assert "FSETP" not in r.loop_mix or norm != "L1"  # L1 forward: no comparison at all
        assert r.instructions_per_term < {"L1": 8, "MCP": 10, "Huber": 10, "HM": 12}[norm]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_float64_kernels_compile_for_sm90_without_spills(aot, backward):
    r = aot.report(backward, torch.float64, "HM")  # the largest variant
    assert r.spill_bytes == 0 and r.stack_bytes == 0
    assert r.tile == tk.tile_sizes(4096, 4096, torch.float64, backward)


def test_float32_reciprocal_is_the_approximate_instruction(aot):
    ptx = aot.compile_kernel(False, torch.float32, "L1").asm["ptx"]
    assert "rcp.approx.ftz.f32" in ptx
    ptx64 = aot.compile_kernel(False, torch.float64, "L1").asm["ptx"]
    assert "rcp.approx" not in ptx64 and "div.rn.f64" in ptx64  # float64 divides exactly


def test_innermost_loop_takes_the_longest_loop_without_nested_loops(aot):
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   FADD R2, R2, R3 ;",          # outer loop start
        "        /*0020*/                   FMUL R4, R4, R5 ;",          # unrolled body start
        "        /*0030*/                   MUFU.RCP R6, R4 ;",
        "        /*0040*/                   FFMA R7, R6, R4, R7 ;",
        "        /*0050*/              @P0 BRA 0x20 ;",                  # unrolled body back-edge
        "        /*0060*/                   MUFU.RCP R6, R4 ;",          # remainder loop
        "        /*0070*/              @P1 BRA 0x60 ;",
        "        /*0080*/              @P2 BRA 0x10 ;",                  # outer back-edge
        "        /*0090*/                   EXIT ;",
    ])
    loop = aot.innermost_loop(sass)
    assert [a for a, _ in loop] == [0x20, 0x30, 0x40, 0x50]
    assert [op for _, op in loop] == ["FMUL", "MUFU", "FFMA", "BRA"]
    with pytest.raises(ValueError, match="no loop"):
        aot.innermost_loop("        /*0000*/                   EXIT ;")


def test_bounds_are_work_over_the_machine_rate(aot):
    machine = {"sms": 2, "schedulers": 4, "clock_hz": 1e9, "mufu_per_clock": 16}
    assert aot.issue_bound_seconds(256e9, 2.0, machine) == pytest.approx(256e9 * 2 / (2 * 4 * 32 * 1e9))
    assert aot.reciprocal_bound_seconds(64e9, 1.0, machine) == pytest.approx(64e9 / (2 * 16 * 1e9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiles_shrink_until_the_grid_fills_the_gpu(dtype):
    big = tk.tile_sizes(1 << 20, 4096, dtype, True, programs=264)
    assert big == tk.TILES[dtype]["backward"]  # enough programs already
    br, bo, _, _ = tk.tile_sizes(4096, 64, dtype, False, programs=264)
    assert -(-4096 // br) * -(-64 // bo) >= 264
    assert (br, bo) != tuple(tk.TILES[dtype]["forward"][:2])
    # a problem too small to fill the GPU stops at the smallest tile
    assert tk.tile_sizes(256, 256, dtype, False, programs=264)[:2] == (tk.MIN_TILE, tk.MIN_TILE)
    # small sides round up to a power of two, at least MIN_TILE
    assert tk.tile_sizes(5, 3, dtype, False)[:2] == (tk.MIN_TILE, tk.MIN_TILE)
    # every group runs its own programs: 8 groups need an eighth of the tiles per group
    br, bo, _, _ = tk.tile_sizes(1024, 256, dtype, False, groups=8, programs=264)
    assert 8 * -(-1024 // br) * -(-256 // bo) >= 264


def test_compile_rejects_an_unsupported_dtype_clearly(aot):
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        aot.compile_kernel(False, torch.float16)
