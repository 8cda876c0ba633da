"""Does a robust source's robustness carry over to the reprogrammed task? The 2 × 2 table.

Rows: source (``zoo:cifar-resnet20``, plain, as control; ``zoo:cifar-resnet20-at``, adversarially
trained) × program (AR as usual; AR with the program trained on PGD copies of each target batch,
``ARConfig.adv_eps``). Target: MNIST digits (16 px in the 32 × 32 canvas, ILM mapping). Every cell
is evaluated on the same first ``--n-test`` test digits: clean accuracy, then FGSM, PGD and
APGD-CE + APGD-DLR (AutoAttack's untargeted half) at each ε of ``--eps`` on the [0, 1] digit,
made against the whole pipeline (program → source → mapping), and the per-point **worst** over
them: the headline. Cells go to ``--out`` (JSON lines, resumable: a finished cell is skipped).

    nice -n 10 python benchmarks/robust_reprogramming.py --out benchmarks/results/robust_reprogramming-DATE.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import robust_surgery as rs  # noqa: E402
from robust_surgery.evaluation.budgets import parse_eps  # noqa: E402
from robust_surgery.nn.backends.c import cpu_features  # noqa: E402
from robust_surgery.reprogram.ar import ARConfig, reprogram_ar  # noqa: E402
from robust_surgery.reprogram.pipeline import load_target, target_accuracy  # noqa: E402

SOURCES = {"plain": "zoo:cifar-resnet20", "robust": "zoo:cifar-resnet20-at"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sources", default="plain,robust")
    ap.add_argument("--programs", default="standard,adversarial")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--adv-eps", default="8/255", help="L∞ budget of the program's adversarial training")
    ap.add_argument("--adv-steps", type=int, default=3)
    ap.add_argument("--eps", default="2/255,8/255", help="evaluation budgets on the [0, 1] digit")
    ap.add_argument("--attacks", default="fgsm,pgd,apgd")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps at evaluation")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {r["key"] for r in rows}
    x, y = load_target("mnist", "train", n=args.n_train)
    xt, yt = load_target("mnist", "test", n=args.n_test)
    adv_eps = parse_eps(args.adv_eps)[0]
    eps = parse_eps(args.eps)
    for src in args.sources.split(","):
        for prog in args.programs.split(","):
            key = f"{src}-{prog}-n{args.n_train}-e{args.epochs}"
            if key in done:
                continue
            torch.manual_seed(0)
            cfg = ARConfig(epochs=args.epochs, lr=args.lr, batch_size=32,
                           adv_eps=adv_eps if prog == "adversarial" else 0.0, adv_steps=args.adv_steps)
            t0 = time.time()
            model, rep = reprogram_ar(rs.load_model(SOURCES[src]), x, y, cfg, data_size=16, mapping="ilm",
                                      progress=True, device="cpu")
            train_s = time.time() - t0
            res = target_accuracy(model, xt, yt, attacks=args.attacks.split(","), eps=eps, steps=args.steps,
                                  progress=True)
            row = {"key": key, "source": SOURCES[src], "program": prog, "adv_eps": cfg.adv_eps,
                   "adv_steps": cfg.adv_steps if cfg.adv_eps else None, "epochs": args.epochs, "lr": args.lr,
                   "n_train": len(x), "train_s": round(train_s, 1), "last_train_acc": rep["history"][-1].get("train_acc"),
                   **res, "cpu": cpu_features(), "threads": torch.get_num_threads()}
            rows.append(row)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: clean {res['clean_acc']:.1f} %, worst {res['worst_acc']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
