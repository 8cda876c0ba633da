"""NRPM kernels benchmark: plain layer vs direct method vs previous vs new (eager, compiled).

Cases (forward + backward, float32, CPU):
  linear   Linear 784→256, batch 256, norm L1, K = 3, λ = 0.5
  conv8    Conv2d 64→64 3×3 pad 1 on 8×64×32×32, K = 3
  conv1    the same conv on one image
  resnet20 cifar-resnet20 (unpretrained weights), every conv converted, K = 1, batch --resnet-batch

Methods: ``plain`` (the dense layer), ``direct`` (every term materialised, tests/nrpm_reference.py;
only where it fits, run in a child process), ``previous`` (the implementation at git HEAD:
chunked forward + autograd-recompute backward, loaded from ``git show HEAD:...``), ``new``
(analytic backward, eager) and ``compiled`` (new, chunk functions through torch.compile).

Timings: median of --runs runs, methods interleaved round-robin in this process, so ratios
are comparable even on a noisy shared machine. Peak memory: each (case, method) once more in a
fresh child process; reported as the growth of its resident high-water mark (VmHWM) over the
resident size after setup (inputs and model built, torch loaded).

    python benchmarks/nrpm_kernels.py [--runs 3] [--resnet-batch 128] [--threads 2] [--skip-direct]
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

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import nrpm_reference as ref  # noqa: E402
from robust_surgery.nn import NRPMConv2d, NRPMLinear, NRPMSettings, layers as nrpm_layers  # noqa: E402
from robust_surgery.nn import functional as nrpm_functional  # noqa: E402
from robust_surgery.nn import kernels  # noqa: E402

LAM = 0.5


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def previous_functional():
    """The NRPM functional module as it is at git HEAD (autograd-recompute backward)."""
    src = subprocess.run(["git", "show", "HEAD:robust_surgery/nn/functional.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.gettempdir()) / "nrpm_previous_functional.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("nrpm_previous_functional", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# Cases: setup() -> (step(method) closure); step runs one forward + backward
# --------------------------------------------------------------------------------------------
def _use(method: str, prev):
    """Point the layers at the implementation of ``method``."""
    kernels.use_compile(method == "compiled")
    impl = prev if method == "previous" else nrpm_functional
    nrpm_layers.nrpm_linear = impl.nrpm_linear
    nrpm_layers.nrpm_conv = impl.nrpm_conv


def setup_linear(args):
    torch.manual_seed(0)
    dense = nn.Linear(784, 256)
    layer = NRPMLinear.from_dense(dense, NRPMSettings("L1", 3, 1e-3), lam=LAM)
    x = torch.rand(256, 784, requires_grad=True)

    def step(method):
        if method == "plain":
            out = dense(x)
        elif method == "direct":
            out = ref.linear(x, dense.weight, dense.bias, layer.lam, 3, "L1", 1e-3)
        else:
            out = layer(x)
        out.square().sum().backward()
        return out.detach()

    terms = 256 * 256 * 784
    return step, terms, 3


def setup_conv(args, batch):
    torch.manual_seed(0)
    dense = nn.Conv2d(64, 64, 3, padding=1)
    layer = NRPMConv2d.from_dense(dense, NRPMSettings("L1", 3, 1e-3), lam=LAM)
    x = torch.rand(batch, 64, 32, 32, requires_grad=True)

    def step(method):
        if method == "plain":
            out = dense(x)
        elif method == "direct":
            out = ref.conv(x, dense.weight, dense.bias, layer.lam, 3, "L1", 1e-3, (1, 1), (1, 1), (1, 1), 1)
        else:
            out = layer(x)
        out.square().sum().backward()
        return out.detach()

    terms = batch * 64 * 576 * 1024
    return step, terms, 3


def setup_resnet(args):
    import robust_surgery as rs
    from robust_surgery.model_zoo.cifar_resnet import cifar_resnet20

    torch.manual_seed(0)
    plain = cifar_resnet20().eval()
    model = rs.convert(plain, paradigm=1, norm="L1", K=1, eps=1e-3, lam=LAM,
                       filter_fn=lambda m, name: isinstance(m, nn.Conv2d))
    x = torch.rand(args.resnet_batch, 3, 32, 32, requires_grad=True)
    terms = 0

    def count(m, inp, out):
        nonlocal terms
        terms += out.numel() * m.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in plain.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        plain(x[:1])
    for h in hooks:
        h.remove()
    terms *= args.resnet_batch

    def step(method):
        net = plain if method == "plain" else model
        out = net(x)
        out.square().sum().backward()
        return out.detach()

    return step, terms, 1


CASES = {
    "linear": ("Linear 784→256, batch 256, K=3", setup_linear),
    "conv1": ("Conv 64→64 3×3, 1×64×32×32, K=3", lambda a: setup_conv(a, 1)),
    "conv8": ("Conv 64→64 3×3, 8×64×32×32, K=3", lambda a: setup_conv(a, 8)),
    "resnet20": ("NRPM cifar-resnet20 (all convs), K=1", setup_resnet),
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
    prev = previous_functional()
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
           "--resnet-batch", str(args.resnet_batch), "--child-runs", str(runs)]
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


def ops_per_term(K: int) -> int:
    """Arithmetic per product term of one forward + backward (counted from kernels.py).

    forward: product (1) + K × (sub, abs, add ε, reciprocal, mul, 2 sums) = 1 + 7K;
    backward: product (1) + K × (sub, sign, abs, add, reciprocal, φ' (2), ·s, sub, ·, +w, ·g, +=, Σa) ≈ 1 + 14K,
    then g_x and g_a (2 multiply-adds each) = 4.
    """
    return 6 + 21 * K


# --------------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resnet-batch", type=int, default=128)
    p.add_argument("--cases", default="linear,conv1,conv8,resnet20")
    p.add_argument("--methods", default="plain,previous,new,compiled")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--child-runs", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    torch.set_num_threads(args.threads)
    thr = machine_throughput(args.threads)
    print(f"# machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
          f"elementwise (addcmul, L2-resident) {thr['elementwise_per_s'] / 1e9:.2f} G/s, "
          f"matmul {thr['matmul_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    prev = previous_functional()
    methods = args.methods.split(",")
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
        for _ in range(args.runs):
            for m in methods:
                _use(m, prev)
                t = time.perf_counter()
                step(m)
                times[m].append(time.perf_counter() - t)
        _use("new", prev)
        for m in methods:
            results[m]["time"] = statistics.median(times[m])
        if "new" in outs:
            for m in methods:
                if m != "plain":
                    results[m]["maxrel"] = float((outs[m] - outs["new"]).abs().max() / outs["new"].abs().max())
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
            f"{m} {r.get('time', float('nan')):.3f}s/{r.get('peak', 0) / 2**20:.0f}MiB" for m, r in results.items()),
            flush=True)

    print()
    print(f"NRPM forward+backward, float32, CPU ({os.cpu_count()} cores, {args.threads} threads, shared and noisy: "
          f"compare ratios). Time: median of {args.runs}; memory: peak resident growth of a fresh process.")
    print()
    print("| case | plain | direct | previous | new (eager) | new (compiled) | new vs direct | new vs previous "
          "| compiled vs previous | new / plain | compiled / plain | bound: unfused | bound: fused | compiled / fused bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def cell(r):
        if not r or "time" not in r:
            return "—" if not r or "error" not in r else "failed"
        mem = f", {r['peak'] / 2**20:.0f} MiB" if "peak" in r else ""
        return f"{r['time']:.3g} s{mem}"

    def ratio(a, b):
        return f"{a['time'] / b['time']:.1f}×" if a and b and "time" in a and "time" in b else "—"

    for case, title, terms, K, r, lower in rows:
        g = r.get
        print(f"| {title} | {cell(g('plain'))} | {cell(g('direct'))} | {cell(g('previous'))} | {cell(g('new'))} "
              f"| {cell(g('compiled'))} | {ratio(g('direct'), g('new'))} | {ratio(g('previous'), g('new'))} "
              f"| {ratio(g('previous'), g('compiled'))} | {ratio(g('new'), g('plain'))} | {ratio(g('compiled'), g('plain'))} "
              f"| {lower[0]:.3g} s | {lower[1]:.3g} s | {g('compiled', {}).get('time', math.nan) / lower[1]:.0f}× |")
    print()
    print(f"Roofline-style bounds: terms × {ops_per_term(1)} (K=1) or {ops_per_term(3)} (K=3) operations per term "
          f"(forward+backward, see ops_per_term) over (unfused) the measured L2-resident elementwise rate, "
          f"{thr['elementwise_per_s'] / 1e9:.2f} G op/s: the floor of any one-op-per-pass (eager) implementation; "
          f"(fused) the measured matmul rate, {thr['matmul_flops'] / 1e9:.0f} GFLOP/s: the floor of a fused kernel "
          f"at the FMA peak (optimistic: the reciprocals cost more than an FMA).")
    for case, title, terms, K, r, lower in rows:
        errs = {m: v.get("maxrel") for m, v in r.items() if v.get("maxrel") is not None}
        firsts = {m: round(v["first"], 2) for m, v in r.items() if "first" in v}
        print(f"- {case}: max |Δ| / max |y| vs new: {errs}; first-call times (s, compile included): {firsts}")


if __name__ == "__main__":
    main()
