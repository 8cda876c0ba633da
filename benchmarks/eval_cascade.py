"""Issue 29: what the standard suite with the cascade costs, beside the protocol the docs used before.

On one model and the first N test points, in one process (same CPU, same load), resumable (state
files in OUT):
- ``before``: every attack on every point (``--per-attack``), the attacks of the docs' paradigm rows:
  FGSM, PGD-50 with 5 restarts, torchattacks' 10-step AutoAttack (``autoattack-10``), Square 1000,
  transfer and BPDA, with the report card;
- ``after``: the standard suite (AutoAttack at its real strength, plus the report card's attacks at
  every ε), cascaded.
Prints wall time, the worst case per ε of each, and their ratio; writes OUT/eval_cascade.json.

    OMP_NUM_THREADS=1 python benchmarks/eval_cascade.py --model zoo:mnist-lenet-p3 --n 1000 --out OUT
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery.nn.backends import c as cpu_kernels


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:mnist-lenet-p3")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--eps", default="0.1,0.3")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=("before", "after"), default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    eps = [float(e) for e in args.eps.split(",")]
    model = rs.load_model(args.model)
    runs = {
        "before": dict(attacks=["fgsm", "pgd", "autoattack-10", "square", "transfer", "bpda"], steps=50, restarts=5,
                       per_attack=True),
        "after": dict(suite="standard"),
    }
    result = {"model": args.model, "n": args.n, "eps": eps, "cpu": cpu_model(), "isa": cpu_kernels.cpu_features(),
              "threads": torch.get_num_threads(), "runs": {}}
    for name, kw in runs.items():
        if args.only and name != args.only:
            continue
        t = time.time()
        rep = rs.evaluate(model, args.data, eps=eps, n=args.n, state=args.out / f"{name}.state", progress=True, **kw)
        result["runs"][name] = {"wall_s_this_process": round(time.time() - t, 1), "complete": rep.complete,
                                "worst": {str(e): w for e, w in rep.worst(rep.variants[0]).items()},
                                "settings": {k: v for k, v in kw.items()}}
        print(name, result["runs"][name], flush=True)
    if len(result["runs"]) == 2:
        b, a = result["runs"]["before"]["wall_s_this_process"], result["runs"]["after"]["wall_s_this_process"]
        result["after_over_before"] = round(a / b, 3)
        print(f"after / before wall time: {a / b:.3f} ({result['cpu']}, {result['isa']})")
    (args.out / "eval_cascade.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
