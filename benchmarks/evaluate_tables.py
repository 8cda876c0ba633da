"""Original vs converted (paradigm 1) robustness tables for the README.

Runs `robust_surgery.evaluate` with the sanity report card on the released MNIST MLP and on
cifar-resnet20, and writes one JSON report per model to OUT_DIR (default benchmarks/results).
CPU budgets: with the fused C kernels a fully converted ResNet-20 (K = 1) costs about 0.045 s per
image per forward+backward on one core (the eager path: about 0.65 s), so --resnet20-autoattack
runs AutoAttack on 200 points in minutes; the default run keeps its older, smaller settings.

    python benchmarks/evaluate_tables.py [OUT_DIR] [--quick] [--resnet20-autoattack]
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

import robust_surgery as rs

console = Console(stderr=True, width=160)


def run(name: str, model, data: str, out_dir: Path, **kw):
    t = time.time()
    report = rs.evaluate(model, data, progress=True, architecture=name, **kw)
    console.print(report)
    d = report.to_dict()
    d["wall_seconds"] = round(time.time() - t, 1)
    d["settings"] = {k: v for k, v in kw.items()}
    (out_dir / f"{name.replace(':', '_')}.json").write_text(json.dumps(d, indent=2, default=str))
    console.print(f"{name}: {d['wall_seconds']} s")
    return report


def main(argv: list[str]) -> None:
    out_dir = Path(argv[0]) if argv and not argv[0].startswith("--") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = "--quick" in argv
    # one thread: the NRPM kernels issue many short parallel operations, and on a busy machine
    # two OpenMP threads waiting on each other are many times slower than one (README, speed)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "--resnet20-autoattack" in argv:
        return resnet20_autoattack(out_dir, quick)

    mlp = rs.load_model("zoo:mnist-mlp")
    mlp_nrpm = rs.convert(mlp, norm="L1", K=1, eps=5e-5, lam=0.6)
    run("mnist-mlp-nrpm-p1", mlp_nrpm, "mnist", out_dir, attacks=("fgsm", "pgd", "autoattack"),
        eps=(0.1, 0.3), n=50 if quick else 100, batch_size=100, steps=20, queries=1000, compare_original=True)

    r20 = rs.load_model("zoo:cifar-resnet20")
    run("cifar-resnet20", r20, "cifar10", out_dir, attacks=("fgsm", "pgd", "autoattack"), eps=(8 / 255,),
        n=200 if not quick else 50, batch_size=100, steps=20)
    r20_nrpm = rs.convert(r20, norm="L1", K=1, eps=1e-3, lam=0.5)
    run("cifar-resnet20-nrpm-p1", r20_nrpm, "cifar10", out_dir, attacks=("fgsm", "pgd"), eps=(8 / 255,),
        n=16 if quick else 32, batch_size=32, steps=5, queries=50, compare_original=True)


def resnet20_autoattack(out_dir: Path, quick: bool) -> None:
    """AutoAttack on cifar-resnet20 with every conv converted (λ = 0.8 keeps clean accuracy near 56 %).

    Resumable: per-point results are kept in OUT_DIR/cifar-resnet20-nrpm-aa.state."""
    r20 = rs.load_model("zoo:cifar-resnet20")
    r20_nrpm = rs.convert(r20, norm="L1", K=1, eps=5e-4, lam=0.8)
    run("cifar-resnet20-nrpm-p1-autoattack", r20_nrpm, "cifar10", out_dir, attacks=("fgsm", "pgd", "autoattack"),
        eps=(8 / 255,), n=16 if quick else 200, batch_size=50, steps=10, queries=100, compare_original=True,
        state=out_dir / "cifar-resnet20-nrpm-aa.state")


if __name__ == "__main__":
    main(sys.argv[1:])
