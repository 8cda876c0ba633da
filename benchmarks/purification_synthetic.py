"""Reproduce the reference synthetic table (docs/purification.md): clean vs adversarial vs noise-trained networks on
the sparse-coding task, purity in the true, ICA and random bases, robust accuracy, the
checkpoint-pair decomposition, purity against the training ε, and the inheritance dose-response.

    nice -n 10 python benchmarks/purification_synthetic.py                 # seeds 0-2, ~15 min CPU
    python benchmarks/purification_synthetic.py --seeds 0 --epochs 5 --n-train 2000 --quick   # smoke run

Writes benchmarks/results/purification_synthetic.json (after every run, so a stopped run keeps
what it measured) and docs/img/purification_synthetic_{hist,eps}.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery.evaluation.run import evaluate
from robust_surgery._files import atomic_path
from robust_surgery.purification.inherit import compare_encoders, random_encoder
from robust_surgery.purification.diagnostics import (checkpoint_pair, next_layer_weights, plot_purity_histograms,
                                         plot_purity_vs_eps)
from robust_surgery.training.pretrain import pretrain
from robust_surgery.purification.scores import ica_basis, purity_scores, random_orthonormal_basis
from robust_surgery.purification.synthetic import SparseCodingTask, oracle_mlp

REPO = Path(__file__).resolve().parents[1]
MLP = "robust_surgery.purification.synthetic:sparse_coding_mlp"


def train(task, kind, eps, args, seed):
    torch.manual_seed(seed)
    model = rs.build_arch(MLP, kwargs={"d": task.d, "hidden": args.hidden, "span": task.span})
    t0 = time.process_time()
    model, history = pretrain(model, task, adversarial=kind, eps=task.pixel_eps(eps) if kind else 0.0, threat="L2",
                              pgd_steps=5, ramp=1 / 3 if kind else 0.0, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, seed=seed)
    return model, history, time.process_time() - t0


def scores(model, task, bases):
    weights = next_layer_weights(model, "fc1")
    out = {}
    for name, atoms in bases.items():
        s = purity_scores(model.fc1.weight, atoms, name=name, unit_weights=weights)
        m = s.summary()
        out[name] = {"pr_mean": m["pr"]["mean"], "pr_median": m["pr"]["median"],
                     "pr_weighted": m["pr"]["weighted_mean"], "top1": m["top1"]["mean"], "hoyer": m["hoyer"]["mean"]}
    return out


def robust(model, task, eps_list, n):
    x, y = task.tensors("test")
    rep = evaluate(model, (x[:n], y[:n]), attacks=("pgd",), eps=[task.pixel_eps(e) for e in eps_list], threat="L2",
                   steps=20, checks=False)
    worst = rep.worst(rep.variants[0])
    return {"clean_acc": 100.0 * rep.clean[rep.variants[0]] / rep.n,
            "robust_acc": {f"{e:g}": worst[task.pixel_eps(e)] for e in eps_list}}


def save(results, path):
    with atomic_path(path, make_parents=True) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps", type=float, default=0.25, help="adversarial training budget (feature units)")
    ap.add_argument("--curve-eps", default="0.1,0.175", help="extra training ε for the purity-vs-ε curve (seed 0)")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/purification_synthetic.json"))
    ap.add_argument("--img", default=str(REPO / "docs/img"))
    ap.add_argument("--quick", action="store_true", help="skip the ε curve and the inheritance table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    eval_eps = (0.1, 0.2, 0.3)
    results = {"settings": vars(args), "runs": [], "pairs": [], "ica": [], "curve": [], "inheritance": None}
    kinds = {"clean": None, "adversarial": "pgd", "noise": "noise"}
    keep = {}
    for seed in seeds:
        task = SparseCodingTask(d=args.d, k=3, noise=0.01, seed=seed, n_train=args.n_train)
        x_train, _, _ = task.features("train")
        t0 = time.process_time()
        ica = ica_basis(x_train, seed=seed)
        unit = ica.atoms / ica.atoms.norm(dim=0, keepdim=True)
        recovery = float((task.dictionary.T @ unit).abs().max(1).values.min())
        results["ica"].append({"seed": seed, "min_abs_cos_true_atom": recovery, "cpu_s": time.process_time() - t0})
        bases = {"true": task.dictionary, "ica": ica.atoms, "random": random_orthonormal_basis(args.d, 100 + seed).atoms}
        models = {}
        for label, kind in kinds.items():
            model, history, cpu = train(task, kind, args.eps, args, seed)
            models[label] = model
            row = {"seed": seed, "training": label, "train_loss": history[-1]["train_loss"], "cpu_s": cpu,
                   **robust(model, task, eval_eps, args.eval_n), "purity": scores(model, task, bases)}
            results["runs"].append(row)
            print(f"seed {seed} {label}: PR true {row['purity']['true']['pr_mean']:.1f} "
                  f"(weighted {row['purity']['true']['pr_weighted']:.1f}), ICA {row['purity']['ica']['pr_mean']:.1f}, "
                  f"random {row['purity']['random']['pr_mean']:.1f}; clean {row['clean_acc']:.1f}, robust "
                  f"{row['robust_acc']}; {cpu:.0f} s CPU", file=sys.stderr, flush=True)
            save(results, args.out)
        results["pairs"].append({"seed": seed, **checkpoint_pair(models["clean"].fc1, models["adversarial"].fc1)})
        if seed == seeds[0]:
            keep = {"task": task, "models": models, "bases": bases}
        save(results, args.out)

    task, models, bases = keep["task"], keep["models"], keep["bases"]
    img = Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    groups = {label: [purity_scores(model.fc1.weight, bases[b], name=b) for b in ("true", "random")]
              for label, model in models.items()}
    plot_purity_histograms(groups, img / "purification_synthetic_hist.png",
                           title=f"synthetic task (d = {args.d}, seed {seeds[0]}): per-unit PR of fc1")

    if not args.quick:
        curve = [(0.0, models["clean"]), (args.eps, models["adversarial"])]
        for e in [float(v) for v in args.curve_eps.split(",") if v.strip()]:
            model, _, cpu = train(task, "pgd", e, args, seeds[0])
            curve.append((e, model))
            print(f"curve ε {e}: {cpu:.0f} s CPU", file=sys.stderr, flush=True)
        for e, model in sorted(curve, key=lambda p: p[0]):
            results["curve"].append({"train_eps": e, **scores(model, task, bases),
                                     **robust(model, task, eval_eps, args.eval_n)})
        save(results, args.out)
        plot_purity_vs_eps({f"{b} basis": [(r["train_eps"], r[b]["pr_mean"]) for r in results["curve"]]
                            for b in ("true", "ica", "random")} |
                           {"true basis, weighted": [(r["train_eps"], r["true"]["pr_weighted"]) for r in results["curve"]]},
                           img / "purification_synthetic_eps.png", xlabel="adversarial training ε (PGD-L2, feature units)",
                           title=f"fc1 purity vs training budget (d = {args.d})", reference=(args.d + 2) / 3)

        # inheritance dose-response: oracle layers of controlled purity beside the trained encoders
        encoders = {f"oracle mix {m:g}": oracle_mlp(task, mix=m, threshold=0.25, hidden=args.hidden)
                    for m in (0.0, 0.5, 1.0, 2.0)}
        encoders.update({f"trained {k}": v for k, v in models.items()})
        encoders["random"] = random_encoder(models["clean"], 0)
        encoders["nrpm (clean, λ 0.5)"] = rs.convert(models["clean"], paradigm=1, lam=0.5, include=["fc1"], inplace=False)
        pr = {name: purity_scores(enc.fc1.weight, task.dictionary).summary()["pr"]["mean"] for name, enc in encoders.items()}
        t0 = time.process_time()
        report = compare_encoders(encoders, task, "relu", eps=[task.pixel_eps(e) for e in eval_eps], threat="L2",
                                  n_train=args.n_train, n_test=args.eval_n, epochs=20, seed=0,
                                  extra={name: (lambda enc, _n=name: {"pr_true": pr[_n]}) for name in encoders})
        inh = report.to_dict()
        inh["eps_feature_units"] = list(eval_eps)
        inh["cpu_s"] = time.process_time() - t0
        results["inheritance"] = inh
        save(results, args.out)

    summary = {}
    for label in kinds:
        rows = [r for r in results["runs"] if r["training"] == label]
        summary[label] = {
            f"{b}_{k}": (statistics.mean(r["purity"][b][k] for r in rows),
                         statistics.pstdev(r["purity"][b][k] for r in rows))
            for b in ("true", "ica", "random") for k in ("pr_mean", "pr_weighted", "pr_median", "top1")
        }
        summary[label]["clean_acc"] = statistics.mean(r["clean_acc"] for r in rows)
        summary[label]["robust_acc"] = {k: statistics.mean(r["robust_acc"][k] for r in rows) for k in rows[0]["robust_acc"]}
    results["summary"] = summary
    save(results, args.out)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
