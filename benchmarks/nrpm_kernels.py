"""NRPM kernels benchmark: plain layer vs direct method vs previous vs new (eager, compiled).

Cases (forward + backward, float32, CPU):
  linear   Linear 784→256, batch 256, norm L1, K = 3, λ = 0.5
  conv8    Conv2d 64→64 3×3 pad 1 on 8×64×32×32, K = 3
  conv1    the same conv on one image
  resnet20 cifar-resnet20 (unpretrained weights), every conv converted, K = 1, batch --resnet-batch

Methods: ``plain`` (the dense layer), ``before`` (today's functional.py over kernels.py of
--before-commit, default cc9511b: the eager path before its workspace buffers), ``direct`` (every term materialised, tests/nrpm_reference.py;
only where it fits, run in a child process), ``previous`` (the first chunked implementation:
chunked forward + autograd-recompute backward, loaded from ``git show 92e2650:...``), ``new``
(analytic backward, eager chunks), ``compiled`` (new, chunk functions through torch.compile) and
``fused`` (the fused C kernels of robust_surgery/nn/backends/c.py, the CPU default).

Timings: median of --runs runs, methods interleaved round-robin in this process, so ratios
are comparable even on a noisy shared machine. Peak memory: each (case, method) once more in a
fresh child process; reported as the growth of its resident high-water mark (VmHWM) over the
resident size after setup (inputs and model built, torch loaded).

    python benchmarks/nrpm_kernels.py [--runs 3] [--resnet-batch 128] [--threads 2] [--skip-direct]
        [--cases linear,conv1,conv8,resnet20] [--methods plain,new,fused] [--json PATH]
        [--isa native|avx512|avx2|generic] [--load N]

Every table names the CPU model, its vector ISA and the flags the C kernels were built with;
``--isa avx2`` builds the AVX2 code an AVX2-only CPU gets, ``--load N`` times beside N busy
processes (the oversubscribed machine). The fused method is also timed forward-only (no grad),
for the backward / forward ratio.

GPU section (runs when CUDA is available, after the CPU section; ``--gpu-only`` skips the CPU
one): the same four cases on the GPU (ResNet-20 at --resnet-batch, default 128), methods
``plain``, ``direct`` (where it fits in GPU memory), ``eager`` (the chunked kernels of
robust_surgery/nn/backends/eager.py with the Triton path switched off) and ``triton`` (the fused
kernels of robust_surgery/nn/backends/triton.py). Time: median of --runs after a warm-up
(Triton compiles there), CUDA-synchronised, methods interleaved; memory: peak allocated by the
step over what was allocated before it (torch.cuda.max_memory_allocated). Roofline: the
arithmetic NRPM needs (ops_per_term) over the time, as a fraction of the GPU's measured
float32 FMA rate (a float32 matmul with TF32 off).

    python benchmarks/nrpm_kernels.py --gpu-only --json benchmarks/results/nrpm_kernels_gpu.json
    python benchmarks/nrpm_kernels.py --gpu-smoke   # the GPU section on CPU in Triton's interpreter,
                                                    # tiny shapes: checks the script, measures nothing

Static GPU report (``--gpu-compile``, no GPU needed): compiles the Triton kernels for sm_90
(H100/H200) with benchmarks/triton_aot.py and prints, per kernel variant, registers, spills
and SASS instructions per product term of the hot loop; then, per case, a lower bound of the
H200 time of the fused kernels from instruction issue and from the reciprocal unit (MUFU, 16
per clock per SM). An estimate, not a measurement.

    python benchmarks/nrpm_kernels.py --gpu-compile --json benchmarks/results/nrpm_kernels_sm90_static.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--gpu-smoke" in sys.argv:  # Triton reads this when its kernels are defined (first import)
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import nrpm_reference as ref  # noqa: E402
from robust_surgery.nn import NRPMConv2d, NRPMLinear, NRPMSettings, layers as nrpm_layers  # noqa: E402
from robust_surgery.nn import functional as nrpm_functional  # noqa: E402
from robust_surgery._files import atomic_path  # noqa: E402
from robust_surgery.nn import backends  # noqa: E402
from robust_surgery.nn.backends import c as cpu_kernels, eager as kernels, triton as triton_kernels  # noqa: E402

LAM = 0.5
PREVIOUS_COMMIT = "92e2650"  # the first chunked implementation (autograd-recompute backward)
BEFORE_COMMIT = "cc9511b"  # kernels.py before the workspace buffers (the eager path of the README's first table)


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def previous_functional():
    """The NRPM functional module of commit PREVIOUS_COMMIT (self-contained: chunked forward, autograd backward)."""
    src = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:robust_surgery/nn/functional.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.gettempdir()) / "nrpm_previous_functional.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("nrpm_previous_functional", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def before_kernels(commit: str):
    """robust_surgery/nn/kernels.py (today's nn/backends/eager.py) as of ``commit``, as a module of the
    package (for method ``before``)."""
    src = subprocess.run(["git", "show", f"{commit}:robust_surgery/nn/kernels.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.gettempdir()) / f"nrpm_kernels_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"robust_surgery.nn._kernels_{commit}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_IMPLS: dict = {}


# --------------------------------------------------------------------------------------------
# Cases: setup(args, device) -> (step(method) closure, terms, K); step runs one forward + backward
# --------------------------------------------------------------------------------------------
def _use(method: str, prev=None):
    """Point the layers at the implementation of ``method``.

    previous: functional.py of PREVIOUS_COMMIT; before: today's functional.py over kernels.py of
    --before-commit (loaded by main into _IMPLS); new / compiled / eager / triton / fused: the
    working tree (fused: the C kernels of cpu_kernels.py; new and eager: the eager chunks).
    """
    kernels.use_compile(method == "compiled")
    backends.use_backend("triton", method == "triton")
    backends.use_backend("c", method == "fused")
    impl = prev if method == "previous" else nrpm_functional
    nrpm_layers.nrpm_linear = impl.nrpm_linear
    nrpm_layers.nrpm_conv = impl.nrpm_conv
    # method "before": the old module is both the row/chunk helpers and the dispatcher
    nrpm_functional._eager = _IMPLS["before"] if method == "before" else kernels
    nrpm_functional.backends = _IMPLS["before"] if method == "before" else backends


def setup_linear(args, device="cpu", size=(256, 784, 256)):
    batch, d_in, d_out = size
    torch.manual_seed(0)
    dense = nn.Linear(d_in, d_out).to(device)
    layer = NRPMLinear.from_dense(dense, NRPMSettings("L1", 3, 1e-3), lam=LAM)
    x = torch.rand(batch, d_in, device=device, requires_grad=True)

    def step(method, backward=True):
        x.grad = None
        if not backward:  # the forward pass alone (no autograd graph)
            with torch.no_grad():
                return (dense if method == "plain" else layer)(x), None
        if method == "plain":
            out = dense(x)
        elif method == "direct":
            out = ref.linear(x, dense.weight, dense.bias, layer.lam, 3, "L1", 1e-3)
        else:
            out = layer(x)
        out.square().sum().backward()
        return out.detach(), x.grad

    return step, batch * d_out * d_in, 3


def setup_conv(args, batch, device="cpu", size=(64, 32)):
    channels, side = size
    torch.manual_seed(0)
    dense = nn.Conv2d(channels, channels, 3, padding=1).to(device)
    layer = NRPMConv2d.from_dense(dense, NRPMSettings("L1", 3, 1e-3), lam=LAM)
    x = torch.rand(batch, channels, side, side, device=device, requires_grad=True)

    def step(method, backward=True):
        x.grad = None
        if not backward:  # the forward pass alone (no autograd graph)
            with torch.no_grad():
                return (dense if method == "plain" else layer)(x), None
        if method == "plain":
            out = dense(x)
        elif method == "direct":
            out = ref.conv(x, dense.weight, dense.bias, layer.lam, 3, "L1", 1e-3, (1, 1), (1, 1), (1, 1), 1)
        else:
            out = layer(x)
        out.square().sum().backward()
        return out.detach(), x.grad

    return step, batch * channels * channels * 9 * side * side, 3


def setup_resnet(args, device="cpu", batch=None):
    import robust_surgery as rs
    from robust_surgery.model_zoo.cifar_resnet import cifar_resnet20

    batch = args.resnet_batch if batch is None else batch
    torch.manual_seed(0)
    plain = cifar_resnet20().eval().to(device)
    model = rs.convert(plain, paradigm=1, norm="L1", K=1, eps=1e-3, lam=LAM,
                       filter_fn=lambda m, name: isinstance(m, nn.Conv2d))
    x = torch.rand(batch, 3, 32, 32, device=device, requires_grad=True)
    terms = 0

    def count(m, inp, out):
        nonlocal terms
        terms += out.numel() * m.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in plain.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        plain(x[:1])
    for h in hooks:
        h.remove()
    terms *= batch

    def step(method, backward=True):
        x.grad = None
        net = plain if method == "plain" else model
        if not backward:  # the forward pass alone (no autograd graph)
            with torch.no_grad():
                return net(x), None
        out = net(x)
        out.square().sum().backward()
        return out.detach(), x.grad

    return step, terms, 1


CASES = {
    "linear": ("Linear 784→256, batch 256, K=3", setup_linear),
    "conv1": ("Conv 64→64 3×3, 1×64×32×32, K=3", lambda a, device="cpu": setup_conv(a, 1, device)),
    "conv8": ("Conv 64→64 3×3, 8×64×32×32, K=3", lambda a, device="cpu": setup_conv(a, 8, device)),
    "resnet20": ("NRPM cifar-resnet20 (all convs), K=1", setup_resnet),
}
SMOKE_CASES = {  # --gpu-smoke: the GPU section's code on tiny shapes (Triton interpreter on CPU)
    "linear": ("Linear 24→8, batch 6, K=3", lambda a, device: setup_linear(a, device, (6, 24, 8))),
    "conv1": ("Conv 4→4 3×3, 1×4×6×6, K=3", lambda a, device: setup_conv(a, 1, device, (4, 6))),
    "conv8": ("Conv 4→4 3×3, 2×4×6×6, K=3", lambda a, device: setup_conv(a, 2, device, (4, 6))),
    "resnet20": ("NRPM cifar-resnet20 (all convs), K=1, batch 1", lambda a, device: setup_resnet(a, device, 1)),
}


def direct_fits(case: str, args) -> bool:
    if args.skip_direct:
        return False
    return case in ("linear", "conv1")  # conv8 needs ~15 GB, resnet20 far more


# --------------------------------------------------------------------------------------------
# Child: one (case, method), reports time of its runs and peak memory growth
# --------------------------------------------------------------------------------------------
def child(args):
    torch.set_num_threads(args.threads)
    prev = previous_functional() if args.method == "previous" else None
    if args.method == "before":
        _IMPLS["before"] = before_kernels(args.before_commit)
    step, _, _ = CASES[args.case][1](args)
    _use(args.method, prev)
    if args.method != "direct":
        step(args.method)  # warm-up (compilation for "compiled"), then reset the high-water mark
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    base = vm("VmRSS")
    times = []
    for _ in range(args.child_runs):
        t = time.perf_counter()
        step(args.method)
        times.append(time.perf_counter() - t)
    print(json.dumps({"time": statistics.median(times), "peak": vm("VmHWM") - base, "hwm": vm("VmHWM")}))


def run_child(case, method, args, runs=1):
    cmd = [sys.executable, __file__, "--child", "--case", case, "--method", method, "--threads", str(args.threads),
           "--resnet-batch", str(args.resnet_batch), "--child-runs", str(runs), "--before-commit", args.before_commit]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Machine throughput (for the roofline estimate)
# --------------------------------------------------------------------------------------------
def machine_throughput(threads: int) -> dict:
    torch.set_num_threads(threads)
    n = 1 << 16  # L2-resident operands: the best case for an elementwise op
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    for _ in range(50):
        torch.addcmul(a, b, c)
    reps = 2000
    t = time.perf_counter()
    for _ in range(reps):
        torch.addcmul(a, b, c)
    elem = n * reps / (time.perf_counter() - t)
    m = torch.rand(1024, 1024)
    m @ m
    t = time.perf_counter()
    for _ in range(5):
        m @ m
    flops = 2 * 1024**3 * 5 / (time.perf_counter() - t)
    return {"elementwise_per_s": elem, "matmul_flops": flops}


def machine_description() -> dict:
    """The CPU model, its vector ISA and the flags the fused kernels were built with (printed with
    every table: timings from different CPUs are only comparable as ratios)."""
    feats = cpu_kernels.cpu_features()
    lib = cpu_kernels.library()
    flags = " ".join(lib.flags) if lib is not None else "not built"
    built = f"kernels built for {lib.isa}: {flags}" if lib is not None else "kernels not built"
    return {**feats, "kernel_isa": getattr(lib, "isa", None), "kernel_flags": flags,
            "text": f"{feats['model']} ({feats['machine']}, vector ISA {feats['isa']}; {built})"}


def ops_per_term(K: int) -> int:
    """Arithmetic per product term of one forward + backward (counted from kernels.py).

    forward: product (1) + K × (sub, abs, add ε, reciprocal, mul, 2 sums) = 1 + 7K;
    backward: product (1) + K × (sub, sign, abs, add, reciprocal, φ' (2), ·s, sub, ·, +w, ·g, +=, Σa) ≈ 1 + 14K,
    then g_x and g_a (2 multiply-adds each) = 4.
    """
    return 6 + 21 * K


# --------------------------------------------------------------------------------------------
def _maxrel(got, want) -> float:
    """max |got - want| / max |want| over the (output, input gradient) pairs of two steps."""
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(got, want))


def cpu_section(args) -> dict:
    """The CPU table (plain, direct, previous, new, compiled); returns its rows for --json."""
    torch.set_num_threads(args.threads)
    thr = machine_throughput(args.threads)
    cpu = machine_description()
    print(f"# CPU: {cpu['text']}", flush=True)
    print(f"# machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
          f"elementwise (addcmul, L2-resident) {thr['elementwise_per_s'] / 1e9:.2f} G/s, "
          f"matmul {thr['matmul_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    methods = args.methods.split(",")
    prev = previous_functional() if "previous" in methods else None
    if "before" in methods:
        _IMPLS["before"] = before_kernels(args.before_commit)
    rows = []
    for case in args.cases.split(","):
        title, setup = CASES[case]
        step, terms, K = setup(args)
        results = {m: {} for m in methods}
        outs = {}
        for m in methods:  # warm-up (and compile) once, check agreement
            _use(m, prev)
            t = time.perf_counter()
            outs[m] = step(m)
            results[m]["first"] = time.perf_counter() - t
        times = {m: [] for m in methods}
        cpu_times = {m: [] for m in methods}
        for _ in range(args.runs):
            for m in methods:
                _use(m, prev)
                t, c = time.perf_counter(), time.process_time()
                step(m)
                times[m].append(time.perf_counter() - t)
                cpu_times[m].append(time.process_time() - c)
        _use("fused", prev)
        for m in methods:
            results[m]["time"] = statistics.median(times[m])
            results[m]["cpu_time"] = statistics.median(cpu_times[m])
        if "fused" in methods:  # the forward pass alone, for backward / forward
            _use("fused", prev)
            forward = []
            for _ in range(args.runs):
                t = time.perf_counter()
                step("fused", backward=False)
                forward.append(time.perf_counter() - t)
            results["fused"]["forward_time"] = statistics.median(forward)
        ref_m = "new" if "new" in outs else None
        if ref_m:
            for m in methods:
                if m != "plain":
                    results[m]["maxrel"] = _maxrel(outs[m], outs[ref_m])
        if direct_fits(case, args):
            d = run_child(case, "direct", args, runs=1)
            results["direct"] = d
            if "time" in d:
                results["direct"]["time"] = d["time"]
        if not args.skip_memory:
            for m in methods:
                results[m].update({k: v for k, v in run_child(case, m, args).items() if k in ("peak", "error")})
        lower = (terms * ops_per_term(K) / thr["elementwise_per_s"], terms * ops_per_term(K) / thr["matmul_flops"])
        rows.append((case, title, terms, K, results, lower))
        print(f"## {title}: {terms / 1e9:.2f} G terms; " + ", ".join(
            f"{m} {r.get('time', float('nan')):.3f}s (CPU {r.get('cpu_time', float('nan')):.3f}s)/"
            f"{r.get('peak', 0) / 2**20:.0f}MiB" for m, r in results.items()), flush=True)
        base = results.get("plain", {})
        if "time" in base:
            print("   ratio to plain (wall, CPU time): " + ", ".join(
                f"{m} {r['time'] / base['time']:.1f}×, {r['cpu_time'] / base['cpu_time']:.1f}×"
                for m, r in results.items() if m != "plain" and "cpu_time" in r), flush=True)

    print()
    print(f"NRPM forward+backward, float32, CPU: {cpu['text']} ({os.cpu_count()} cores, {args.threads} threads"
          f"{f', {args.load} competing busy process(es)' if args.load else ''}; compare ratios). Time: median of "
          f"{args.runs}; memory: peak resident growth of a fresh process.")
    print()
    names = {"plain": "plain", "direct": "direct", "before": "before", "previous": "previous", "new": "eager",
             "compiled": "compiled", "fused": "fused (C)"}
    shown = [m for m in ("plain", "direct", "before", "previous", "new", "compiled", "fused")
             if any(m in r for *_, r, _ in rows)]
    best = "fused" if "fused" in shown else "new"
    print("| case | " + " | ".join(names[m] for m in shown) + f" | {names[best]} vs direct | {names[best]} vs eager "
          f"| {names[best]} / plain | bound: unfused | bound: fused | {names[best]} / fused bound "
          f"| fused forward | fused backward / forward |")
    print("|" + " --- |" * (len(shown) + 9))
    for case, title, terms, K, r, lower in rows:
        g = r.get
        fwd = g("fused", {}).get("forward_time")
        bwd_fwd = (g("fused")["time"] - fwd) / fwd if fwd else math.nan
        print(f"| {title} | " + " | ".join(_cell(g(m)) for m in shown)
              + f" | {_ratio(g('direct'), g(best))} | {_ratio(g('new'), g(best))} | {_ratio(g(best), g('plain'))} "
              f"| {lower[0]:.3g} s | {lower[1]:.3g} s | {g(best, {}).get('time', math.nan) / lower[1]:.1f}× "
              f"| {'—' if not fwd else f'{fwd:.3g} s'} | {bwd_fwd:.1f}× |")
    print()
    print(f"Roofline-style bounds: terms × {ops_per_term(1)} (K=1) or {ops_per_term(3)} (K=3) operations per term "
          f"(forward+backward, see ops_per_term) over (unfused) the measured L2-resident elementwise rate, "
          f"{thr['elementwise_per_s'] / 1e9:.2f} G op/s: the floor of any one-op-per-pass (eager) implementation; "
          f"(fused) the measured matmul rate, {thr['matmul_flops'] / 1e9:.0f} GFLOP/s: the floor of a fused kernel "
          f"at the FMA peak (optimistic: the reciprocals cost more than an FMA).")
    for case, title, terms, K, r, lower in rows:
        errs = {m: v.get("maxrel") for m, v in r.items() if v.get("maxrel") is not None}
        firsts = {m: round(v["first"], 2) for m, v in r.items() if "first" in v}
        print(f"- {case}: max |Δ| / max |y| vs eager: {errs}; first-call times (s, compile included): {firsts}")
    return {"device": "cpu", "cpu": cpu, "threads": args.threads, "load": args.load, "runs": args.runs, "throughput": thr,
            "cases": [{"case": c, "title": t, "terms": n, "K": K, "results": r,
                       "bound_unfused_s": lo[0], "bound_fused_s": lo[1]} for c, t, n, K, r, lo in rows]}


def _cell(r):
    if not r or "time" not in r:
        return "—" if not r or "error" not in r else "failed"
    mem = f", {r['peak'] / 2**20:.0f} MiB" if r.get("peak") is not None else ""
    return f"{r['time']:.3g} s{mem}"


def _ratio(a, b):
    return f"{a['time'] / b['time']:.1f}×" if a and b and "time" in a and "time" in b else "—"


# --------------------------------------------------------------------------------------------
# GPU section
# --------------------------------------------------------------------------------------------
GPU_METHODS = ("plain", "direct", "eager", "triton")


def gpu_throughput(device: str) -> dict:
    """Measured float32 FMA rate (matmul, TF32 off) and elementwise rate (addcmul, HBM-resident) of the GPU."""
    if device != "cuda":  # --gpu-smoke: nothing meaningful to measure
        return {"matmul_flops": math.nan, "elementwise_per_s": math.nan, "name": "cpu (smoke test)"}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        n = 8192
        a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
        a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        flops = 2 * n**3 * 10 / (time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    m = 1 << 27
    x, y, z = (torch.rand(m, device=device) for _ in range(3))
    torch.addcmul(x, y, z)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        torch.addcmul(x, y, z)
    torch.cuda.synchronize()
    elem = m * 20 / (time.perf_counter() - t)
    return {"matmul_flops": flops, "elementwise_per_s": elem, "name": torch.cuda.get_device_name()}


def _gpu_direct_fits(case: str, free_bytes: float, smoke: bool) -> bool:
    need = {"linear": 3e9, "conv1": 3e9, "conv8": 24e9}.get(case)  # measured on CPU: 2.8, 3.0, ~15 GB
    return need is not None and (smoke or need < 0.8 * free_bytes)


def gpu_section(args) -> dict:
    """Plain vs direct vs eager kernels vs fused Triton on the GPU (or, --gpu-smoke, on CPU in the interpreter)."""
    smoke = args.gpu_smoke
    device = "cpu" if smoke else "cuda"
    sync = (lambda: None) if smoke else torch.cuda.synchronize
    thr = gpu_throughput(device)
    free = torch.cuda.mem_get_info()[0] if not smoke else math.inf
    print(f"# GPU: {thr['name']}; float32 matmul (TF32 off) {thr['matmul_flops'] / 1e12:.1f} TFLOP/s, "
          f"elementwise (addcmul) {thr['elementwise_per_s'] / 1e9:.0f} G/s; triton available: "
          f"{triton_kernels.available()}", flush=True)
    cases = SMOKE_CASES if smoke else CASES
    rows = []
    for case in args.cases.split(","):
        title, setup = cases[case]
        step, terms, K = setup(args, device)
        methods = [m for m in GPU_METHODS if m != "direct" or _gpu_direct_fits(case, free, smoke)]
        results = {m: {} for m in methods}
        outs = {}

        def timed(m):
            _use(m)
            sync()
            t = time.perf_counter()
            out = step(m)
            sync()
            return time.perf_counter() - t, out

        for m in methods:  # warm-up: Triton compiles here
            before = dict(triton_kernels.calls)
            results[m]["first"], outs[m] = timed(m)
            results[m]["triton_launches"] = sum(triton_kernels.calls[k] - before[k] for k in before)
        times = {m: [] for m in methods}
        for _ in range(args.runs):
            for m in methods:
                times[m].append(timed(m)[0])
        for m in methods:
            results[m]["time"] = statistics.median(times[m])
            if m != "plain":
                results[m]["maxrel_vs_eager"] = _maxrel(outs[m], outs["eager"])
            if not smoke:
                _use(m)
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(m)
                sync()
                results[m]["peak"] = torch.cuda.max_memory_allocated() - base
        _use("eager")
        del outs
        flops = terms * ops_per_term(K)
        rate = flops / results["triton"]["time"]
        rows.append({"case": case, "title": title, "terms": terms, "K": K, "results": results,
                     "triton_flops_per_s": rate, "fraction_of_fp32_peak": rate / thr["matmul_flops"]})
        print(f"## {title}: {terms / 1e9:.2f} G terms; " + ", ".join(
            f"{m} {r['time']:.4f}s/{r.get('peak', 0) / 2**20:.0f}MiB" for m, r in results.items()), flush=True)
        if not smoke:
            torch.cuda.empty_cache()

    print()
    print(f"NRPM forward+backward, float32, {thr['name']}. Time: median of {args.runs} after a warm-up; memory: "
          "peak allocated by one step over what was allocated before it.")
    print()
    print("| case | plain | direct | eager kernels | Triton | Triton vs direct | Triton vs eager | Triton / plain "
          "| Triton op rate | fraction of FP32 peak | max rel. Δ Triton vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        g = row["results"].get
        print(f"| {row['title']} | {_cell(g('plain'))} | {_cell(g('direct'))} | {_cell(g('eager'))} "
              f"| {_cell(g('triton'))} | {_ratio(g('direct'), g('triton'))} | {_ratio(g('eager'), g('triton'))} "
              f"| {_ratio(g('triton'), g('plain'))} | {row['triton_flops_per_s'] / 1e12:.2f} T op/s "
              f"| {100 * row['fraction_of_fp32_peak']:.1f} % | {g('triton')['maxrel_vs_eager']:.1e} |")
    print()
    print(f"Op rate: terms × ops_per_term(K) ({ops_per_term(1)} for K=1, {ops_per_term(3)} for K=3; forward+backward) "
          f"over the Triton time; peak: the measured float32 matmul rate, {thr['matmul_flops'] / 1e12:.1f} TFLOP/s "
          "(each op counted as one FMA: optimistic, the reciprocal unit runs at 1/8 of that rate on Hopper: "
          "16 vs 128 per SM per clock).")
    launches = {r["case"]: r["results"]["triton"]["triton_launches"] for r in rows}
    print(f"Triton launches in the warm-up step (0 would mean the fused path did not run): {launches}")
    return {"device": thr["name"], "smoke": smoke, "runs": args.runs, "throughput": thr, "cases": rows}


def gpu_compile_section(args) -> dict:
    """Static sm_90 report of the Triton kernels and H200 lower bounds per case (no GPU needed)."""
    import triton_aot  # benchmarks/triton_aot.py, beside this script

    arch = 90
    kernels_rows = []
    print(f"# Triton kernels compiled for sm_{arch} without a GPU (benchmarks/triton_aot.py)")
    print()
    print("| kernel | dtype | norm | tile BR×BO, unroll, warps | registers | spilled bytes | SASS instr./term "
          "| MUFU/term |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.float64):
        for backward in (False, True):
            for norm in ("L1", "MCP", "Huber", "HM"):
                r = triton_aot.report(backward, dtype, norm, arch)
                row = {"kernel": "backward" if backward else "forward", "dtype": str(dtype).split(".")[1],
                       "norm": norm, "tile": r.tile, "registers": r.registers, "spill_bytes": r.spill_bytes,
                       "instructions_per_term": r.instructions_per_term,
                       "mufu_per_term": r.loop_mix.get("MUFU", 0) / r.terms_per_trip, "loop_mix": r.loop_mix}
                kernels_rows.append(row)
                br, bo, unroll, warps = r.tile
                print(f"| {row['kernel']} | {row['dtype']} | {norm} | {br}×{bo}, {unroll}, {warps} | {r.registers} "
                      f"| {r.spill_bytes} | {r.instructions_per_term:.2f} | {row['mufu_per_term']:.2f} |", flush=True)
    ipt = {(row["kernel"], row["dtype"], row["norm"]): row for row in kernels_rows}
    fwd, bwd = ipt["forward", "float32", "L1"], ipt["backward", "float32", "L1"]
    m = triton_aot.H200
    cases = []
    print()
    print(f"Lower bounds for one float32 forward+backward on an H200 ({m['sms']} SMs, {m['clock_hz'] / 1e9:.2f} GHz), "
          "norm L1: the forward kernel makes K passes over the terms, the backward kernel K more.")
    print()
    print("| case | terms per pass | K | issue bound | MUFU bound | lower bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        title, setup = CASES[case]
        _, terms, K = setup(args, "cpu")
        issue = triton_aot.issue_bound_seconds(terms * K, fwd["instructions_per_term"] + bwd["instructions_per_term"])
        mufu = triton_aot.reciprocal_bound_seconds(terms * K, fwd["mufu_per_term"] + bwd["mufu_per_term"])
        cases.append({"case": case, "title": title, "terms": terms, "K": K, "issue_bound_s": issue,
                      "mufu_bound_s": mufu, "lower_bound_s": max(issue, mufu)})
        print(f"| {title} | {terms / 1e9:.3f} G | {K} | {issue * 1e3:.3f} ms | {mufu * 1e3:.3f} ms "
              f"| {max(issue, mufu) * 1e3:.3f} ms |", flush=True)
    return {"arch": arch, "machine": m, "kernels": kernels_rows, "cases": cases}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--cases", default="linear,conv1,conv8,resnet20")
    p.add_argument("--methods", default="plain,new,fused",
                   help="CPU section methods (also: before = kernels.py of --before-commit)")
    p.add_argument("--before-commit", default=BEFORE_COMMIT)
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU section")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    p.add_argument("--gpu-smoke", action="store_true",
                   help="run the GPU section's code on CPU in Triton's interpreter, tiny shapes (a check, no numbers)")
    p.add_argument("--gpu-compile", action="store_true",
                   help="only the static sm_90 report: compile the Triton kernels without a GPU, count SASS")
    p.add_argument("--isa", choices=["native", *cpu_kernels.ISA_FLAGS],
                   help="build the fused C kernels for this target (sets ROBUST_SURGERY_NRPM_CPU_ISA; avx2 on an "
                        "AVX-512 CPU reproduces an AVX2-only machine's code)")
    p.add_argument("--load", type=int, default=0,
                   help="run the CPU section beside N busy-looping processes (a loaded machine)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--child-runs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.isa:
        os.environ[cpu_kernels.ISA_ENV] = args.isa  # child processes inherit it
    if args.child:
        return child(args)
    report = {"torch": torch.__version__}
    if args.gpu_compile:
        report["sm90_static"] = gpu_compile_section(args)
    elif not args.gpu_only and not args.gpu_smoke:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            report["cpu"] = cpu_section(args)
        finally:
            for sp in spinners:
                sp.kill()
    if args.gpu_compile:
        pass
    elif args.gpu_smoke or (not args.no_gpu and torch.cuda.is_available()):
        if args.gpu_smoke:
            torch.set_num_threads(args.threads)
        report["gpu"] = gpu_section(args)
    elif args.gpu_only:
        print("no CUDA device: the GPU section needs one (or --gpu-smoke to check the script on CPU)", file=sys.stderr)
        return 1
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
