"""The GPU check: are the Triton kernels right on real hardware, how fast are they, does training run?

One command, at most about 8 minutes on one H200, everything written as JSON:

(a) **correctness** — the Triton forward and backward (output, input and weight gradients) of
    NRPM Linear and Conv2d layers against the float64 eager reference on fresh random inputs,
    across norms (L1, MCP, Huber, HM), K (1, 3), conv geometries (3×3, stride 2, 1×1, groups,
    depthwise, dilation, 5×5 on 3 channels) and both dtypes; each case says which backend ran
    (the Triton call counter must move) and its largest relative error;
(b) **timing** — the GPU section of ``benchmarks/nrpm_kernels.py`` (Linear, conv and a fully
    converted cifar-resnet20 forward+backward at batch 128: plain cuDNN, the direct method,
    the eager kernels, Triton), and the fraction of the issue-rate lower bound that
    ``benchmarks/triton_aot.py`` predicts for the same case;
(c) **training** — one short paradigm-3 epoch of the pretrained cifar-resnet20 (converted as the
    zoo recipe ``cifar-resnet20-p3`` converts it) on CIFAR-10 training images with FGSM batches
    (ε = 8/255, the loss half clean, half adversarial), through the library's one training loop:
    images per second, clean test accuracy before and after, FGSM accuracy after;
(d) everything in ``OUT/gpu_check.json`` (and the console log on stdout).

The device machine has its own Python (no torchattacks there, perhaps no PIL): the check uses
no torchattacks (its FGSM is three lines here) and reads CIFAR-10 from ``.pt`` tensors made here::

    python benchmarks/gpu_check.py --prepare .gpu_check_data        # here: 10 000 train + 1 000 test images, the weights
    # then with the device tool, carrying .gpu_check_data (git-ignored):
    python benchmarks/gpu_check.py --data .gpu_check_data --out "$OUT"

``--cpu-smoke`` runs the same code on tiny sizes on the CPU (Triton's interpreter, random data,
unpretrained weights) in a few seconds: the test suite runs it so the script cannot rot.
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # Triton reads this when its kernels are defined: before any import of them
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO / "tests", REPO / "benchmarks", REPO):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _alias_uninstalled_package() -> None:
    """Without ``pip install`` (the device machine runs a copy of the checkout), ``robust_surgery.model_zoo``
    is the top-level ``model_zoo/`` folder: register it under the package name the library imports."""
    import robust_surgery

    if importlib.util.find_spec("robust_surgery.model_zoo") is None:
        folder = REPO / "model_zoo"
        spec = importlib.util.spec_from_file_location("robust_surgery.model_zoo", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        zoo_pkg = importlib.util.module_from_spec(spec)
        sys.modules["robust_surgery.model_zoo"] = zoo_pkg  # before it runs: its registration imports it by this name
        robust_surgery.model_zoo = zoo_pkg
        spec.loader.exec_module(zoo_pkg)


_alias_uninstalled_package()

import robust_surgery as rs  # noqa: E402
from robust_surgery._json import strict_dumps  # noqa: E402
from robust_surgery._loops import evaluate_accuracy  # noqa: E402
from robust_surgery.nn import NRPMConv2d, NRPMLinear, NRPMSettings, backends  # noqa: E402

NORMS = ("L1", "MCP", "Huber", "HM")
# name: (in channels, out channels, kernel, stride, padding, dilation, groups, input side)
GEOMETRIES = {
    "3x3": (16, 16, 3, 1, 1, 1, 1, 12),
    "stride2": (16, 32, 3, 2, 1, 1, 1, 12),
    "1x1": (32, 16, 1, 1, 0, 1, 1, 8),
    "groups2": (16, 16, 3, 1, 1, 1, 2, 10),
    "depthwise": (16, 16, 3, 1, 1, 1, 16, 10),
    "dilated": (8, 16, 3, 1, 2, 2, 1, 12),
    "5x5-rgb": (3, 16, 5, 1, 2, 1, 1, 16),
}
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9}  # largest |Δ| over the largest |reference|


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _layer(kind: str, norm: str, K: int, smoke: bool, seed: int):
    """A fresh float64 NRPM layer and input (CPU), seeded; small in the smoke mode."""
    g = torch.Generator().manual_seed(seed)
    settings = NRPMSettings(norm, K)
    if kind == "linear":
        d_in, d_out, batch = (12, 6, 4) if smoke else (256, 96, 64)
        layer = NRPMLinear(d_in, d_out, settings=settings, lam=0.5).double()
        x = torch.rand(batch, d_in, generator=g, dtype=torch.float64)
    else:
        c_in, c_out, k, stride, pad, dil, groups, side = GEOMETRIES[kind]
        if smoke:
            c_in, c_out, side = min(c_in, 4), min(c_out, 4), 6
            groups = min(groups, c_in) if c_in % min(groups, c_in) == 0 else 1
        layer = NRPMConv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                           settings=settings, lam=0.5).double()
        x = torch.rand(1 if smoke else 4, c_in, side, side, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return layer, x


def _forward_backward(layer, x):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    out.backward(grad)
    return [out.detach(), x.grad.detach(), layer.weight.grad.detach()]


def correctness(device: str, smoke: bool) -> dict:
    """(a): Triton vs the float64 eager reference; one row per (layer, norm, K, dtype)."""
    tri = backends.get_backend("triton")
    kinds = ("linear", "3x3", "depthwise") if smoke else ("linear", *GEOMETRIES)
    norms, ks = (("L1", "MCP"), (1, 2)) if smoke else (NORMS, (1, 3))
    rows = []
    for i, (kind, norm, K, dtype) in enumerate((a, b, c, d) for a in kinds for b in norms for c in ks
                                                for d in (torch.float32, torch.float64)):
        layer, x = _layer(kind, norm, K, smoke, seed=i)
        backends.use_backend("c", False)
        try:
            want = _forward_backward(layer, x)  # eager, float64, CPU: the reference
        finally:
            backends.use_backend("c", None)
        layer.zero_grad(set_to_none=True)
        test = layer.to(device=device, dtype=dtype)
        before = tri.calls["forward"] + tri.calls["backward"]
        got = _forward_backward(test, x.to(device=device, dtype=dtype))
        _sync(device)
        ran = tri.calls["forward"] + tri.calls["backward"] - before
        errs = [float((g.double().cpu() - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want)]
        ok = ran >= 2 and max(errs) <= TOLERANCE[dtype]
        rows.append({"layer": kind, "norm": norm, "K": K, "dtype": str(dtype).split(".")[1], "triton_calls": ran,
                     "rel_err_out": errs[0], "rel_err_grad_x": errs[1], "rel_err_grad_w": errs[2], "passed": ok})
        print(f"  {kind:9s} {norm:5s} K={K} {rows[-1]['dtype']}: triton calls {ran}, rel. err out/gx/gw "
              f"{errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return {"cases": rows, "passed": all(r["passed"] for r in rows), "tolerance": {"float32": 1e-3, "float64": 1e-9}}


def timing(smoke: bool, runs: int) -> dict:
    """(b): the GPU section of nrpm_kernels.py, and the measured time over triton_aot's lower bound."""
    import nrpm_kernels

    # smoke: no resnet20 (minutes in Triton's interpreter); the code path is the same as the conv case's
    args = SimpleNamespace(gpu_smoke=smoke, cases="linear,conv8" if smoke else "linear,conv8,resnet20", runs=1 if smoke else runs,
                           resnet_batch=128, threads=torch.get_num_threads(), skip_direct=False, skip_memory=smoke)
    try:
        out = {"measured": nrpm_kernels.gpu_section(args)}
    finally:  # the benchmark switches backends per method; hand the say back to the defaults
        backends.use_backend("triton", None)
        backends.use_backend("c", None)
        backends.get_backend("eager").use_compile(False)
    if not smoke:
        try:
            bounds = {c["case"]: c for c in nrpm_kernels.gpu_compile_section(args)["cases"]}
            for row in out["measured"]["cases"]:
                b = bounds.get(row["case"])
                if b:
                    row["lower_bound_s"] = b["lower_bound_s"]
                    row["fraction_of_bound"] = b["lower_bound_s"] / row["results"]["triton"]["time"]
            out["bounds"] = list(bounds.values())
        except Exception as err:  # noqa: BLE001 - the static report is a bonus; the measurement stands alone
            out["bounds_error"] = f"{type(err).__name__}: {err}"
    return out


def _fgsm(model, x, y, eps: float):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def training(device: str, data: Path | None, smoke: bool, n_train: int, batch_size: int) -> dict:
    """(c): one paradigm-3 epoch of cifar-resnet20 with FGSM batches, through the one training loop."""
    from robust_surgery.data.resolve import resolve_data
    from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop

    if smoke:  # a tiny conv net on random 8×8 images: the same loop, seconds in Triton's interpreter
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        xt, yt = x[:8], y[:8]
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    else:
        x, y = resolve_data(data / "cifar10-train.pt", "train", n=n_train).tensors
        xt, yt = resolve_data(data / "cifar10-test.pt", "test").tensors
        model = rs.load_model("zoo:cifar-resnet20", data_root=str(data))
    if smoke:
        settings = dict(norm="L1", K=1, eps=5e-4, lam=0.8)
    else:  # the conversion of the zoo's paradigm-3 recipe (L1, K = 1, ε = 5e-4, λ = 0.8)
        from robust_surgery.model_zoo.hardened import HARDENED

        settings = dict(HARDENED["cifar-resnet20-p3"].convert)
    net = rs.convert(model, paradigm=3, **settings).to(device)
    before = 100.0 * evaluate_accuracy(net, xt, yt, batch_size=500, device=device)[0] / len(xt)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(params, "sgd", 0.01, momentum=0.9, weight_decay=5e-4)
    eps = 8 / 255

    def step(xb, yb, epoch, s):
        net.eval()
        x_adv = _fgsm(net, xb, yb, eps)
        net.train()
        return BatchLoss(0.5 * F.cross_entropy(net(xb), yb) + 0.5 * F.cross_entropy(net(x_adv), yb))

    tri = backends.get_backend("triton")
    calls = tri.calls["forward"]
    _sync(device)
    t0 = time.perf_counter()
    result = train_loop(net, opt, x, y, step, epochs=1, batch_size=batch_size,
                        order=lambda epoch: torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)),
                        device=device)
    _sync(device)
    seconds = time.perf_counter() - t0
    after = 100.0 * evaluate_accuracy(net, xt, yt, batch_size=500, device=device)[0] / len(xt)
    net.eval()
    robust = sum(int((net(_fgsm(net, xt[i:i + 500].to(device), yt[i:i + 500].to(device), eps)).argmax(1)
                      == yt[i:i + 500].to(device)).sum()) for i in range(0, len(xt), 500))
    name = "tiny conv net (smoke)" if smoke else "cifar-resnet20"
    row = {"model": f"{name}, paradigm 3, settings " + json.dumps(settings), "n_train": len(x),
           "batch_size": batch_size, "fgsm_eps": "8/255", "seconds": seconds, "images_per_s": len(x) / seconds,
           "train_loss": result.history[0]["train_loss"], "clean_acc_before": before, "clean_acc_after": after,
           "fgsm_acc_after": 100.0 * robust / len(xt), "test_n": len(xt), "triton_forward_calls": tri.calls["forward"] - calls}
    print(f"  {len(x)} images in {seconds:.1f} s ({row['images_per_s']:.0f} images/s, FGSM batches); clean test "
          f"accuracy {before:.1f} → {after:.1f} %, FGSM {row['fgsm_acc_after']:.1f} %", flush=True)
    return row


def prepare(dest: Path, data_root: str | None, n_train: int, n_test: int) -> None:
    """Write what the device run reads: CIFAR-10 subsets as uint8 .pt tensors and the resnet20 weights."""
    from robust_surgery.data.datasets import find_data_file, load_cifar10

    dest.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = load_cifar10(split, data_root)
        images = (x[:n] * 255).round().to(torch.uint8)
        torch.save({"images": images, "labels": y[:n].clone()}, dest / f"cifar10-{split}.pt")
    weights = "pretrained/resnet20-12fca82f.th"
    src = find_data_file(weights, data_root)
    (dest / "pretrained").mkdir(exist_ok=True)
    shutil.copyfile(src, dest / weights)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 2**20:.1f} MiB): carry it to the device run")


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "cpu": platform.processor() or platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")), help="folder for gpu_check.json")
    ap.add_argument("--data", type=Path, help="the folder --prepare wrote (CIFAR-10 .pt tensors, resnet20 weights)")
    ap.add_argument("--prepare", type=Path, help="write that folder here and stop")
    ap.add_argument("--data-root", help="where --prepare finds CIFAR-10 and the weights (default: the library's data root)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter): checks the script")
    ap.add_argument("--sections", default="correctness,timing,training")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default 128; smoke 8)")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.data_root, args.n_train, args.n_test)
        return 0
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
        return 2
    sections = [s for s in args.sections.split(",") if s]
    if "training" in sections and not args.cpu_smoke and not (args.data and (args.data / "cifar10-train.pt").exists()):
        print("error: the training section needs --data DIR written by --prepare DIR", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": args.cpu_smoke,
              "machine": machine(device)}
    print(f"# GPU check {report['date']}: {json.dumps(report['machine'])}", flush=True)
    t_all = time.perf_counter()
    for name in sections:
        t0 = time.perf_counter()
        print(f"## {name}", flush=True)
        try:
            if name == "correctness":
                report[name] = correctness(device, args.cpu_smoke)
            elif name == "timing":
                report[name] = timing(args.cpu_smoke, args.runs)
            elif name == "training":
                report[name] = training(device, args.data, args.cpu_smoke, args.n_train,
                                        args.batch_size or (8 if args.cpu_smoke else 128))
            else:
                raise ValueError(f"unknown section {name!r}")
        except Exception as err:  # noqa: BLE001 - one failing section must not lose the others' results
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        report.setdefault("seconds", {})[name] = time.perf_counter() - t0
    report["seconds"]["total"] = time.perf_counter() - t_all
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    path.write_text(strict_dumps(report, indent=2))
    failed = [n for n in sections if "error" in report[n] or report[n].get("passed") is False]
    print(f"wrote {path}; {report['seconds']['total']:.0f} s; " + (f"FAILED: {failed}" if failed else "all sections ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
