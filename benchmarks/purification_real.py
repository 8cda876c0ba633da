"""Purification on real data: first-layer purity of an MNIST LeNet trained clean vs adversarially,
and of cifar-resnet20's conv1 before and after adversarial fine-tuning, in the ICA basis (learned
from the layer's own input patches) beside the random controls; basis-free diagnostics,
checkpoint-pair decomposition, robust accuracy and the inheritance probe (MNIST parity).

    nice -n 10 python benchmarks/purification_real.py            # a few minutes of CPU per part
    python benchmarks/purification_real.py --part lenet --n-train 2000 --epochs 1   # smoke run

Writes benchmarks/results/purification_real.json and docs/img/purification_{lenet,resnet20}_*.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery.evaluation.run import evaluate
from robust_surgery._files import atomic_path
from robust_surgery.purification.inherit import compare_encoders, random_encoder
from robust_surgery.training.pretrain import pretrain
from robust_surgery.purification.diagnostics import (hook_diagnostics, load_images, plot_filters, plot_purity_histograms,
                                         purification_report)

REPO = Path(__file__).resolve().parents[1]


def robust(model, data, eps, n):
    rep = evaluate(model, data, attacks=("pgd",), eps=eps, n=n, steps=20, checks=False)
    worst = rep.worst(rep.variants[0])
    return {"clean_acc": 100.0 * rep.clean[rep.variants[0]] / rep.n, "n_examples": rep.n,
            "robust_acc": {f"{e:.4g}": worst[e] for e in eps}}


def purity(model, data, layer, name, basis, n, other=None, other_name=None):
    rep = purification_report(model, data, layer, basis=basis, n=n, n_patches=20000, seed=0, compare=other,
                              model_name=name, compare_name=other_name)
    return rep, rep.to_dict()


def save(results, path):
    with atomic_path(path, make_parents=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def lenet_part(args, results, img):
    t0 = time.process_time()
    base = rs.load_model("zoo:mnist-lenet")
    models = {}
    for label, adv in (("clean", None), ("adversarial", "pgd")):
        model = random_encoder(base, seed=0)  # the same initialisation for both: the pair is meaningful
        t = time.process_time()
        model, history = pretrain(model, "mnist", adversarial=adv, eps=0.3 if adv else 0.0, threat="Linf",
                                  pgd_steps=5, ramp=1 / 3 if adv else 0.0, epochs=args.epochs, lr=1e-3,
                                  batch_size=128, n_train=args.n_train, seed=0)
        models[label] = model
        print(f"lenet {label}: {time.process_time() - t:.0f} s CPU, loss {history[-1]['train_loss']:.3f}",
              file=sys.stderr, flush=True)
    models["release (zoo:mnist-lenet)"] = base
    out = {"settings": {"n_train": args.n_train, "epochs": args.epochs, "train_eps": 0.3, "threat": "Linf",
                        "pgd_steps": 5, "ramp": 1 / 3}, "models": {}}
    reports = {}
    for label, model in models.items():
        rep, d = purity(model, "mnist", "conv1", label, "ica", args.n,
                        other=models["adversarial"] if label == "clean" else None,
                        other_name="adversarial" if label == "clean" else None)
        reports[label] = rep
        diag = hook_diagnostics(model, load_images("mnist", args.n)[0], ["conv1", "conv2", "fc1"])
        d["depth_diagnostics"] = {k: {"kurtosis_mean": float(v["kurtosis"].nanmean()),
                                      "active_mean": float(v["active"].mean())} for k, v in diag.items()}
        d.update(robust(model, "mnist", [0.1, 0.2, 0.3], args.eval_n))
        out["models"][label] = d
        print(f"lenet {label}: PR ica {d['purity']['ica']['pr']['mean']:.2f}, random-white "
              f"{d['purity']['random-white']['pr']['mean']:.2f}, random {d['purity']['random']['pr']['mean']:.2f}; "
              f"clean {d['clean_acc']:.1f} robust {d['robust_acc']}", file=sys.stderr, flush=True)
        results["lenet"] = out
        save(results, args.out)
    plot_filters({"clean": models["clean"].conv1, "adversarial (PGD ε 0.3)": models["adversarial"].conv1,
                  "release": base.conv1}, img / "purification_lenet_filters.png")
    plot_purity_histograms({k: v for k, v in reports.items() if k != "release (zoo:mnist-lenet)"},
                           img / "purification_lenet_hist.png", title="LeNet conv1: per-unit PR (5×5 patches)")
    t = time.process_time()
    encoders = {"clean": models["clean"], "adversarial": models["adversarial"],
                "nrpm (clean, λ 0.5)": rs.convert(models["clean"], paradigm=1, lam=0.5, inplace=False),
                "random": random_encoder(base, seed=1)}
    inh = compare_encoders(encoders, "mnist", "relu3", downstream="parity", eps=[0.1, 0.2], threat="Linf",
                           n_train=args.n_train, n_test=args.eval_n, epochs=20)
    out["inheritance"] = {**inh.to_dict(), "cpu_s": time.process_time() - t}
    out["cpu_s"] = time.process_time() - t0
    results["lenet"] = out
    save(results, args.out)


def resnet_part(args, results, img):
    t0 = time.process_time()
    before = rs.load_model("zoo:cifar-resnet20")
    after = rs.load_model("zoo:cifar-resnet20")
    t = time.process_time()
    after, history = pretrain(after, "cifar10", adversarial="pgd", eps=8 / 255, threat="Linf", pgd_steps=3,
                              ramp=0.0, epochs=1, lr=args.resnet_lr, optimizer="sgd", batch_size=128,
                              n_train=args.resnet_n_train, seed=0)
    print(f"resnet20 adversarial fine-tuning: {time.process_time() - t:.0f} s CPU", file=sys.stderr, flush=True)
    out = {"settings": {"n_train": args.resnet_n_train, "epochs": 1, "train_eps": "8/255", "threat": "Linf",
                        "pgd_steps": 3, "optimizer": "sgd", "lr": args.resnet_lr}, "models": {}}
    reports = {}
    for label, model in (("before", before), ("after adversarial fine-tuning", after)):
        rep, d = purity(model, "cifar10", "conv1", label, "ica", args.n,
                        other=after if label == "before" else None, other_name="after" if label == "before" else None)
        reports[label] = rep
        d.update(robust(model, "cifar10", [2 / 255, 8 / 255], args.resnet_eval_n))
        out["models"][label] = d
        print(f"resnet20 {label}: PR ica {d['purity']['ica']['pr']['mean']:.2f}, random "
              f"{d['purity']['random']['pr']['mean']:.2f}; clean {d['clean_acc']:.1f} robust {d['robust_acc']}",
              file=sys.stderr, flush=True)
    plot_filters({"before": before.conv1, "after adversarial fine-tuning": after.conv1},
                 img / "purification_resnet20_filters.png")
    plot_purity_histograms(reports, img / "purification_resnet20_hist.png",
                           title="cifar-resnet20 conv1: per-unit PR (3×3×3 patches)")
    out["cpu_s"] = time.process_time() - t0
    results["resnet20"] = out
    save(results, args.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "lenet", "resnet20"), default="all")
    ap.add_argument("--n-train", type=int, default=20000, help="LeNet training points")
    ap.add_argument("--epochs", type=int, default=3, help="LeNet epochs")
    ap.add_argument("--n", type=int, default=2000, help="inputs for the bases and diagnostics")
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--resnet-n-train", type=int, default=5000)
    ap.add_argument("--resnet-lr", type=float, default=0.01)
    ap.add_argument("--resnet-eval-n", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/purification_real.json"))
    ap.add_argument("--img", default=str(REPO / "docs/img"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["settings"] = vars(args)
    if args.part in ("all", "lenet"):
        lenet_part(args, results, img)
    if args.part in ("all", "resnet20"):
        resnet_part(args, results, img)
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
