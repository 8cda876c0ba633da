"""Fused C kernels for the NRPM IRLS on CPU (forward and analytic backward).

The eager chunked path (:mod:`robust_surgery.nn.backends.eager`) materialises every chunk's product
terms and spends most of its time writing and reading them; these kernels compute the same
numbers (same φ, φ', IRLS step and vector-Jacobian product) one (row, output) pair at a time,
with the terms only ever in vector registers, in ``_nrpm_cpu.c``:

* forward: per row and output, K passes over the D terms, each accumulating ``Σ w`` and
  ``Σ w u``; writes z_K and, when backward will follow, z_1..z_K and S_0..S_{K-1}.
* backward: per row and output, k = K−1 … 0, one pass recomputing the terms, adding the term
  gradient's two reductions into g_x (the row's own slice) and g_w (a per-thread copy, summed
  afterwards), and carrying dL/dz_k back to z_0.

Convolutions never unfold their input: the kernel gathers each row's D patch values from the
padded input into a small per-thread buffer (offsets from :func:`conv_geometry`) and backward
scatters the row's input gradient back the same way, so neither the unfolded input nor its
gradient exists. Dense rows (Linear) are the degenerate case (:func:`dense_geometry`). Rows are shared out over
``torch.get_num_threads()`` OpenMP threads dynamically, so a thread slowed down by another
process on its core hands work to the others. Backward cuts its work into a fixed number of
partitions (:func:`backward_partitions`; conv: whole (group, item) blocks, so that no two
threads add into the same input place; for a single image, rows with a private input gradient
per partition), each with its own weight-gradient slice, summed in order: the gradients are
the same bit for bit for any thread count.

Build: on first use the C file is compiled with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``; ``-O3 -fno-trapping-math -march=native -fopenmp``, with
``-mprefer-vector-width=512`` on AVX-512 CPUs, falling back to fewer flags; another target with
``ROBUST_SURGERY_NRPM_CPU_ISA=avx512|avx2|generic``, see :data:`ISA_FLAGS`) into a cache
folder (``$ROBUST_SURGERY_CACHE/kernels``, default ``~/.cache/robust_surgery/kernels``), keyed by the source, flags and CPU model, and loaded with ctypes;
it takes about a second and happens once per machine. Without a working compiler, a warning
says so once and the eager path runs (same numbers, slower).

Supported: the built-in norms while their registered functions are the built-in ones, K ≥ 1,
float32 and float64 CPU tensors. ``ROBUST_SURGERY_NRPM_CPU_KERNEL=0`` or ``use_backend("c", False)``
(:mod:`robust_surgery.nn.backends`) turns the path off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Optional

import torch

from robust_surgery._files import atomic_path
from robust_surgery.nn.functional import builtin_norm_code
from robust_surgery.nn.backends.base import Switch, new_counter
from robust_surgery.errors import InvalidInputError

SOURCE = Path(__file__).with_name("_nrpm_cpu.c")
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
ISA_ENV = "ROBUST_SURGERY_NRPM_CPU_ISA"
# Instruction-set targets (ROBUST_SURGERY_NRPM_CPU_ISA): "native" (default) builds for this CPU,
# with 512-bit vectors where it has AVX-512 (backward about 1.2x faster there); the others build
# a fixed target, to test or to ship: "avx512" (x86-64-v4), "avx2" (x86-64-v3: AVX2 + FMA),
# "generic" (the compiler's baseline: SSE2 on x86-64, NEON on aarch64).
ISA_FLAGS = {
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    "avx2": ["-march=x86-64-v3"],
    "generic": [],
}
# -fno-trapping-math lets the compiler turn the reweighting's clamps into vector blends on ISAs
# without masked operations (AVX2, NEON); it changes no result (nothing here traps or reads the
# floating-point flags), unlike -ffast-math, which is not used.
_COMMON = ["-O3", "-fno-trapping-math"]


NAME = "c"
switch = Switch("ROBUST_SURGERY_NRPM_CPU_KERNEL", default=True)
_lib: Optional[ctypes.CDLL] = None
_lib_isa: Optional[str] = None
_build_error: Optional[str] = None
calls = new_counter()  # kernel calls in this process (tests check dispatch)


def available() -> bool:
    """True when a C compiler is on this machine (the kernels build on first use)."""
    return _compiler() is not None


def enabled() -> bool:
    """Whether the C path may be used (``use_backend("c", ...)`` or env ROBUST_SURGERY_NRPM_CPU_KERNEL, default on)."""
    return switch() and available()


def cache_dir() -> Path:
    """Where the compiled kernel library is kept: the library's cache folder (robust_surgery.data.datasets) / kernels."""
    from robust_surgery.data.datasets import cache_dir as data_cache_dir

    return data_cache_dir() / "kernels"


def _compiler() -> Optional[str]:
    """The C compiler's path ($CC, else cc, gcc or clang on PATH), None without one."""
    return _find_compiler(os.environ.get("CC"), os.environ.get("PATH"))


@functools.lru_cache(maxsize=8)
def _find_compiler(cc: Optional[str], path: Optional[str]) -> Optional[str]:  # cached: PATH lookups cost 50 µs
    for name in (cc, "cc", "gcc", "clang"):
        if name and shutil.which(name, path=path):
            return shutil.which(name, path=path)
    return None


def _cpu_model() -> str:
    """The CPU model (part of the cache key: -march=native code must not move to another CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict:
    """What this CPU offers: its model name, architecture and vector ISA ("avx512", "avx2", "sse2",
    "sve", "neon" or "unknown"), read from /proc/cpuinfo (printed with every kernel timing)."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("cpu family", "model") and key not in ids:
                ids[key] = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if ids:  # virtual machines often hide the exact model name: family/model tell the generation
        model = f"{model} (family {ids.get('cpu family', '?')}, model {ids.get('model', '?')})"
    if "avx512f" in flags:
        isa = "avx512"
    elif {"avx2", "fma"} <= flags:
        isa = "avx2"
    elif "sve" in flags:
        isa = "sve"
    elif "asimd" in flags or platform.machine() in ("aarch64", "arm64"):
        isa = "neon"
    elif "sse2" in flags:
        isa = "sse2"
    else:
        isa = "unknown"
    return {"model": model, "machine": platform.machine(), "isa": isa}


def selected_isa() -> str:
    """The ISA target the kernels are built for: $ROBUST_SURGERY_NRPM_CPU_ISA, default "native"."""
    isa = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if isa != "native" and isa not in ISA_FLAGS:
        raise InvalidInputError(f"{ISA_ENV}={isa!r} is not a kernel target; choose native, {', '.join(ISA_FLAGS)}")
    return isa


def flag_sets(isa: str) -> list[list[str]]:
    """Compiler flag sets for ``isa``, best first; the first that builds wins."""
    if isa == "native":
        first = ["-march=native", "-mprefer-vector-width=512"] if cpu_features()["isa"] == "avx512" else ["-march=native"]
        targets = [first, ["-march=native"], []]
    else:
        targets = [ISA_FLAGS[isa]]
        if isa != "generic":
            targets.append([])  # the compiler's baseline when the target is not supported
    sets, seen = [], set()
    for target in targets:
        for tail in (["-fopenmp"], ["-fopenmp-simd"], []):
            flags = [*_COMMON, *target, *tail]
            if tuple(flags) not in seen:
                seen.add(tuple(flags))
                sets.append(flags)
    return sets


class _CompileError(Exception):
    pass


def _build(isa: str | None = None) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel library for ``isa`` (default
    :func:`selected_isa`); RuntimeError saying why on failure."""
    isa = isa or selected_isa()
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    src = SOURCE.read_bytes()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the kernel cache folder {folder} ({err}); set ROBUST_SURGERY_CACHE") from err
    machine = b"\0".join([src, cc.encode(), _cpu_model().encode(), platform.platform().encode()])
    errors = []
    for flags in flag_sets(isa):
        key = hashlib.sha256(machine + b"\0" + " ".join(flags).encode()).hexdigest()[:16]
        lib = folder / f"nrpm_cpu_{key}.so"
        if not lib.exists():
            try:
                with atomic_path(lib) as tmp:  # a concurrent build finds a whole library or none
                    cmd = [cc, *flags, "-std=c99", "-fPIC", "-shared", "-o", str(tmp), str(SOURCE), "-lm"]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise _CompileError(f"{' '.join(flags)}: {proc.stderr.strip()[-300:] or f'exit status {proc.returncode}'}")
            except _CompileError as err:
                errors.append(str(err))
                continue
        try:
            loaded = _declare(_load_passive(lib))
        except OSError as err:
            errors.append(f"{' '.join(flags)}: loading {lib} failed: {err}")
            continue
        loaded.flags = flags
        loaded.isa = isa
        return loaded
    raise RuntimeError("compiling the NRPM CPU kernel failed: " + " | ".join(errors))


def _load_passive(lib: Path) -> ctypes.CDLL:
    """Load the library with its OpenMP threads waiting passively (unless the user chose a policy).

    The kernels' OpenMP runtime is the system's libgomp, loaded here, next to torch's own copy. By
    default libgomp threads spin for a while after each parallel region; on a busy machine (another
    job on the cores) the spinning threads of two runtimes take the cores from the threads doing the
    work, and 2 threads run slower than 1. Passive threads sleep at once: the kernels are one call
    per layer and pass (milliseconds), so the microseconds of waking them cost nothing measurable.
    libgomp reads the policy when it is loaded, so it is set only for that moment.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return ctypes.CDLL(str(lib))
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(lib))
    finally:
        del os.environ["OMP_WAIT_POLICY"]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    signatures = {
        "nrpm_forward": [p] * 8 + [i64] * 7 + [i, i, f, f, f, i, i],
        "nrpm_backward": [p] * 11 + [i64] * 9 + [i, i, f, f, f, i, i, i],
    }
    for suffix in DTYPES.values():
        for name, args in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes = args
            fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library for :func:`selected_isa`, building it on first call; None (after
    one warning) when it cannot be built. ``library().flags`` are the flags it was built with."""
    global _lib, _build_error, _lib_isa
    isa = selected_isa()
    if isa != _lib_isa:  # another target was asked for (tests, benchmarks): build that one
        _lib, _build_error, _lib_isa = None, None, isa
    if _lib is None and _build_error is None:
        try:
            _lib = _build()
        except RuntimeError as err:
            _build_error = str(err)
            warnings.warn(f"NRPM: {err}; using the slower eager path", RuntimeWarning)
    return _lib


def supports(settings, x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor) -> bool:
    """Whether the C kernels can run this problem: x (G, R, D), w (G, O, D), z0 (G, R, O).

    Needs the path enabled, CPU float32/float64 tensors of one dtype, a non-empty problem,
    K ≥ 1, a built-in norm and a library that builds.
    """
    if not switch() or x.device.type != "cpu":  # not enabled(): a missing compiler warns once, in library()
        return False
    if x.dtype not in DTYPES or w.dtype != x.dtype or z0.dtype != x.dtype:
        return False
    if x.numel() == 0 or w.numel() == 0 or settings.K < 1 or builtin_norm_code(settings.norm) is None:
        return False
    return library() is not None


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _scalars(settings) -> tuple:
    return builtin_norm_code(settings.norm), settings.eps, settings.gamma, settings.delta


# --------------------------------------------------------------------------------------------
# Geometry: where each row's D values sit in the input the kernels read
# --------------------------------------------------------------------------------------------
def dense_geometry(x: torch.Tensor) -> dict:
    """Offsets that read the rows of x (G, R, D), contiguous, as the kernels read conv patches:
    each row is one "item" with a single position (``Lp`` = 1) and taps 0..D-1."""
    G, R, D = x.shape
    return {"koff": torch.arange(D), "loff": torch.zeros(1, dtype=torch.int64), "item": D, "group": R * D,
            "B": R, "Lp": 1}


def conv_geometry(src) -> dict:
    """Offsets that address a conv row source's patches in its padded input xp (B, C, *S), contiguous.

    ``koff`` (D,): offset of each patch tap inside one item's group block, in the order of
    ``weight[o].flatten()`` (channel, then kernel positions); ``loff`` (L,): offset of each output
    position's window; ``item``/``group``: the strides of one batch item and one channel group.
    """
    xp = src.xp
    S = xp.shape[2:]
    n = len(S)
    sstride = [math.prod(S[j + 1:]) for j in range(n)]
    plane = math.prod(S)
    koff = (torch.arange(src.C // src.G) * plane).view(-1, *([1] * n))
    loff = torch.zeros((1,) * n, dtype=torch.int64)
    for j in range(n):
        shape = [1] * n
        shape[j] = -1
        koff = koff + (torch.arange(src.kernel[j]) * src.dilation[j] * sstride[j]).view(1, *shape)
        loff = loff + (torch.arange(src.L[j]) * src.stride[j] * sstride[j]).view(shape)
    return {"koff": koff.reshape(-1).contiguous(), "loff": loff.reshape(-1).contiguous(),
            "item": src.C * plane, "group": src.C // src.G * plane, "B": src.B, "Lp": src.Lp}


# --------------------------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------------------------
def forward(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, settings, keep: bool, geo: Optional[dict] = None):
    """K IRLS steps fused, for every row. w (G, O, D), z0 (G, R, O) -> z_K (G, R, O), zs, sums.

    ``x``: rows x (G, R, D) (``geo`` None), or the input the rows are gathered from as ``geo``
    says (a conv's padded input (B, C, *S), ``geo`` from :func:`conv_geometry`). ``zs``, ``sums``:
    z_1..z_K and S_0..S_{K-1} stacked (K, G, R, O), what backward needs; None unless ``keep``.
    """
    G, O, D = w.shape
    K = settings.K
    x, w, z0 = x.detach().contiguous(), w.detach().contiguous(), z0.detach().contiguous()
    geo = dense_geometry(x) if geo is None else geo
    out = torch.empty_like(z0)
    zs = torch.empty((K, *z0.shape), dtype=z0.dtype) if keep else out
    sums = torch.empty((K, *z0.shape), dtype=z0.dtype) if keep else out
    fn = getattr(library(), f"nrpm_forward_{DTYPES[x.dtype]}")
    fn(_ptr(x), _ptr(geo["koff"]), _ptr(geo["loff"]), _ptr(w), _ptr(z0), _ptr(out), _ptr(zs), _ptr(sums),
       G, geo["B"], geo["Lp"], O, D, geo["item"], geo["group"], K, *_scalars(settings), int(keep),
       torch.get_num_threads())
    calls["forward"] += 1
    return out, (zs if keep else None), (sums if keep else None)


def backward(x: torch.Tensor, w: torch.Tensor, z0: torch.Tensor, zs, sums, grad: torch.Tensor, settings,
             need_x: bool, need_w: bool, geo: Optional[dict] = None):
    """Fused VJP of :func:`forward` (same ``x`` and ``geo``). zs, sums: what it kept; grad (G, R, O) = dL/dz_K.

    Returns (g_x shaped like x, or None; g_w (G, O, D) or None; g_z0 (G, R, O)).
    """
    G, O, D = w.shape
    threads = torch.get_num_threads()
    x, w, z0, zs, sums, grad = (t.detach().contiguous() for t in (x, w, z0, zs, sums, grad))
    geo = dense_geometry(x) if geo is None else geo
    private, parts = backward_partitions(G, geo["B"], geo["Lp"], O, D, x.numel(), x.element_size(), need_x, need_w)
    gx = torch.zeros((parts if private else 1, *x.shape), dtype=x.dtype) if need_x else grad
    gw_parts = torch.zeros((parts, G, O, D), dtype=w.dtype) if need_w else grad
    gz0 = torch.empty_like(grad)
    fn = getattr(library(), f"nrpm_backward_{DTYPES[x.dtype]}")
    fn(_ptr(x), _ptr(geo["koff"]), _ptr(geo["loff"]), _ptr(w), _ptr(z0), _ptr(zs), _ptr(sums), _ptr(grad),
       _ptr(gx), _ptr(gw_parts), _ptr(gz0), G, geo["B"], geo["Lp"], O, D, geo["item"], geo["group"],
       x.numel() if private else 0, parts, settings.K, *_scalars(settings), int(need_x), int(need_w), threads)
    calls["backward"] += 1
    gx = (gx.sum(0) if private else gx[0]) if need_x else None
    return gx, (gw_parts.sum(0) if need_w else None), gz0


# backward work partitions: at least 16 (enough for a few threads to share the work out under load)
# and one per CPU of the machine, so every core can take part; never the thread count, so that the
# gradients do not change with it
PARTITIONS = max(16, os.cpu_count() or 1)
PARTITION_BYTES = 256 << 20  # the most memory the partitions' private gradients may take
PRIVATE_BELOW = 4  # fewer (group, item) blocks than this: rows are the units, input gradients private


def backward_partitions(G: int, B: int, Lp: int, O: int, D: int, x_numel: int, itemsize: int, need_x: bool,
                        need_w: bool) -> tuple[bool, int]:
    """How backward cuts its work: (private input gradients?, number of partitions).

    Units are whole (group, item) blocks, or single rows when there are fewer than
    :data:`PRIVATE_BELOW` blocks (one image, say), each partition then adding its input gradient
    into a private copy (memory: partitions × the input). The count depends on the shapes and the
    machine alone, never on the thread count or the load, so the summed gradients are the same
    bit for bit however the partitions were scheduled.
    """
    private = need_x and G * B < PRIVATE_BELOW
    units = G * B * Lp if private else G * B
    per_part = itemsize * ((G * O * D if need_w else 0) + (x_numel if private else 0))
    fits = PARTITION_BYTES // per_part if per_part else PARTITIONS
    return private, int(max(1, min(units, PARTITIONS, fits)))


def run(src, x, w, z0, settings, reweight=None, dreweight=None, rows=None, outs=None) -> torch.Tensor:
    """z_NRPM (G, R, O) of a row source of the eager backend (dense rows, or conv rows gathered
    from the padded input inside the kernel), differentiable in x, w and z0; one kernel call per
    layer and direction, through the ``robust_surgery::nrpm_irls`` operator
    (:mod:`robust_surgery.nn.backends.ops`), which torch.compile and torch.export keep as one node.
    ``rows`` × ``outs`` (the eager chunk size) serve only if the kernel fails and eager takes over."""
    from robust_surgery.nn.backends import ops

    return ops.run(NAME, src, x, w, z0, settings, rows or 1, outs or 1)


def disable(err: Exception) -> None:
    """Warn that a kernel failed and switch the C path off for this process."""
    switch.fail("the CPU kernel", err)
