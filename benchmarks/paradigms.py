"""Paradigm table: original vs paradigm 1 / 2 / 3 vs classical adversarial training.

For each model: the original network; paradigm 1 (λ and knobs by hand); paradigm 2 (λ only,
FGSM-adversarial fine-tuning from paradigm 1); paradigm 3 (everything, FGSM-adversarial, from
paradigm 1); and plain adversarial training of the original network with the same budget and
loop (converted at λ = 1, where NRPM layers are exactly the dense layers, then paradigm 3:
λ's logit is +∞ and its gradient 0, so only the ordinary weights train). Each row: clean,
FGSM and PGD accuracy on the first N test points, and the CPU seconds of its training.

    python benchmarks/paradigms.py [--models mlp,lenet,resnet20] [--n-train 10000] [--epochs 1]
        [--n-test 1000] [--out benchmarks/results/paradigms.json]

cifar-resnet20 is included only when asked: a fully converted ResNet-20 costs about 0.045 s per
image for forward + backward on one core with the fused C kernels, so one adversarial epoch on
2000 images is about 10 minutes (README: the measured table and its command).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import robust_surgery as rs

MODELS = {
    # name: (zoo spec, data, paradigm-1 settings, train ε, eval ε list)
    "mlp": ("zoo:mnist-mlp", "mnist", dict(norm="L1", K=1, eps=5e-5, lam=0.6), 0.2, (0.1, 0.2, 0.3)),
    "lenet": ("zoo:mnist-lenet", "mnist", dict(norm="L1", K=1, eps=1e-3, lam=0.6), 0.2, (0.1, 0.2, 0.3)),
    "resnet20": ("zoo:cifar-resnet20", "cifar10", dict(norm="L1", K=1, eps=5e-4, lam=0.8), 8 / 255, (8 / 255,)),
}


def _evaluate(model, data, eps, n_test, pgd_steps):
    rep = rs.evaluate(model, data, attacks=("fgsm", "pgd"), eps=eps, n=n_test, steps=pgd_steps, checks=False,
                      batch_size=250)
    v = rep.variants[0]
    return {
        "clean": 100.0 * rep.clean[v] / rep.n,
        **{f"fgsm@{e:g}": rep.robust_acc(v, "fgsm", e) for e in eps},
        **{f"pgd@{e:g}": rep.robust_acc(v, "pgd", e) for e in eps},
    }


def run_model(key: str, args) -> list[dict]:
    spec, data, p1, train_eps, eps = MODELS[key]
    base = rs.load_model(spec)
    rows = []

    def add(name, model, seconds, extra=None):
        t = time.process_time()
        row = {"model": spec, "variant": name, "train_cpu_s": round(seconds, 1),
               **_evaluate(model, data, eps, args.n_test, args.pgd_steps), **(extra or {})}
        row["eval_cpu_s"] = round(time.process_time() - t, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    add("original", base, 0.0)
    p1_model = rs.convert(base, 1, **p1)
    add("paradigm 1", p1_model, 0.0, {"lam": p1["lam"]})
    ft = dict(adversarial="fgsm", eps=train_eps, epochs=args.epochs, n_train=args.n_train, val_n=args.val_n,
              batch_size=64, progress=True, adv_weight=args.adv_weight)
    for paradigm, lr, opt in ((2, args.lr_lambda, "adam"), (3, args.lr_all, "adam")):
        t = time.process_time()
        tuned, hist = rs.finetune(rs.convert(base, 1, **p1), data, paradigm, lr=lr, optimizer=opt, **ft)
        lams = {n: round(m.lam_value, 3) for n, m in rs.nrpm_layers(tuned)}
        kept = rs._meta.get_meta(tuned)["training"]["kept_epoch"]
        add(f"paradigm {paradigm}", tuned, time.process_time() - t, {"lam": lams, "kept_epoch": kept})
    t = time.process_time()
    adv, _ = rs.finetune(rs.convert(base, 1, lam=1.0), data, 3, lr=args.lr_all, optimizer="adam", **ft)
    add("adversarial training (original network)", adv, time.process_time() - t)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--val-n", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--lr-lambda", type=float, default=0.05, help="Adam lr for paradigm 2 (λ logits)")
    ap.add_argument("--lr-all", type=float, default=1e-3, help="Adam lr for paradigm 3 and adversarial training")
    ap.add_argument("--adv-weight", type=float, default=0.5, help="adversarial share of the fine-tuning loss")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "paradigms.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for key in args.models.split(","):
        rows += run_model(key.strip(), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))
    cols = [k for k in rows[0] if k not in ("model", "variant", "lam")]
    print("| model | variant | " + " | ".join(cols) + " |")
    print("| --- | --- |" + " --- |" * len(cols))
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | " + " | ".join(
            f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
