"""Full-data paradigm table with the worst case over adaptive attacks (resumable).

For one zoo model: the original network, paradigm 1 (the preset's settings), paradigm 2 (λ
only), paradigm 3 (everything) and classical adversarial training of the original network with
the same loop, budget and epochs (converted at λ = 1, so only the ordinary weights move). The
fine-tuned rows train on the whole training split (the last --val-n points held out to pick the
best epoch) with PGD (--train-steps steps, random start, step 2.5·ε/steps) at --train-eps, the
loss mixing clean and adversarial cross-entropy (--adv-weight).

Evaluation, per row: clean accuracy on the whole test set; on the first --n-eval test points at
every ε of --eps: FGSM, PGD (--pgd-steps, --restarts), AutoAttack (standard), Square, and on
converted rows transfer (PGD from the λ = 1 network) and BPDA, with the report card; the
headline is the per-point worst case. Everything is resumable: each trained model is saved as
OUT/<row>.safetensors (training checkpoints in OUT/ckpt-<row>/), each evaluation keeps its
per-point state in OUT/<row>.state and its report in OUT/<row>.json (RobustBench field names);
rerun the same command to continue. OUT/table.md is the summary.

    python benchmarks/paradigms_full.py --model mlp --out benchmarks/results/paradigms-full-mlp
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery._json import strict
from robust_surgery.nn.backends import c as cpu_kernels
from robust_surgery.evaluation.run import format_eps, parse_eps
from robust_surgery.model_zoo.hardened import HARDENED, HardenRecipe, harden

MODELS = {
    # name: (zoo spec, data set, paradigm-1 settings)
    "mlp": ("zoo:mnist-mlp", "mnist", dict(norm="L1", K=1, eps=5e-5, lam=0.6)),
    "lenet": ("zoo:mnist-lenet", "mnist", dict(norm="L1", K=1, eps=1e-3, lam=0.6)),
    "resnet20": ("zoo:cifar-resnet20", "cifar10", dict(norm="L1", K=1, eps=5e-4, lam=0.8)),
    # the NRPM release's PGD-trained narrow ResNet-18 with its own settings: the 16 block convs, λ = 0.9
    "tiny-resnet18": ("zoo:cifar-tiny-resnet18", "cifar10",
                      dict(norm="L1", K=1, eps=5e-4, lam=0.9, include="re:layer\\d\\.\\d\\.conv\\d")),
}
ATTACK_COLUMNS = ("fgsm", "pgd", "autoattack", "apgd", "square", "transfer", "bpda")
ROWS = ("original", "paradigm-1", "paradigm-3", "adversarial-training", "paradigm-2")


def row_recipe(row: str, args) -> HardenRecipe:
    """The recipe of a trained row (paradigm 2 or 3, adversarial training); the zoo's recipe when
    the settings match one: then the row's model is that zoo model."""
    spec, _, p1 = MODELS[args.model]
    paradigm = 2 if row == "paradigm-2" else 3
    return HardenRecipe(spec[4:], None if row == "adversarial-training" else p1, eps=args.train_eps,
                        steps=args.train_steps, epochs=args.epochs, lr=args.lr_lambda if paradigm == 2 else args.lr_all,
                        batch_size=args.batch_size, adv_weight=args.adv_weight, val_n=args.val_n, paradigm=paradigm,
                        optimizer=args.optimizer, schedule=args.schedule, alpha=args.train_alpha)


def build_row(row: str, args, out: Path):
    """The model of one row: loaded from OUT/<row>.safetensors when it exists, else built (and trained)."""
    spec, _, p1 = MODELS[args.model]
    path = out / f"{row}.safetensors"
    if path.exists():
        return rs.load(path), json.loads((out / f"{row}.train.json").read_text()) if (out / f"{row}.train.json").exists() else {}
    info: dict = {}
    if row == "original":
        return rs.load_model(spec), info
    if row == "paradigm-1":
        model = rs.convert(rs.load_model(spec), 1, **p1)
    else:  # trained rows: paradigm 2 (λ alone, from paradigm 1), paradigm 3, adversarial training
        recipe = row_recipe(row, args)
        model, metrics = harden(recipe, checkpoint_dir=out / f"ckpt-{row}", log=out / f"{row}.log.json",
                                checkpoint_every=args.checkpoint_every)
        same = [name for name, r in HARDENED.items() if r == recipe]
        info = {k: metrics[k] for k in ("train_cpu_s", "kept_epoch", "lam", "test_acc")}
        # the epochs' own seconds: also right when this run resumed a finished training
        info.update(train_wall_s=round(sum(h["seconds"] for h in metrics["history"]), 1), recipe=asdict(recipe),
                    paradigm=recipe.paradigm, lr=recipe.lr, zoo=same[0] if same else None,
                    cpu=cpu_kernels.cpu_features(), threads=torch.get_num_threads())
    rs.save(model, path)
    (out / f"{row}.train.json").write_text(json.dumps(info, indent=1))
    return model, info


def evaluate_row(row: str, model, args, out: Path) -> dict:
    _, data, _ = MODELS[args.model]
    report_path = out / f"{row}.json"
    if report_path.exists():
        result = json.loads(report_path.read_text())
        if "worst_first_batch" not in result and (out / f"{row}.state").exists():
            result["worst_first_batch"] = first_batch_worst(out / f"{row}.state", result["results"], args.eval_batch)
            report_path.write_text(json.dumps(strict(result), indent=1))
        return result
    t = time.time()
    clean = rs.evaluate(model, data, attacks=["fgsm"], eps=[0.0], checks=False, batch_size=500)
    converted = rs.is_converted(model)
    attacks = args.attacks.split(",") + (["transfer", "bpda"] if converted else [])
    rep = rs.evaluate(model, data, attacks=attacks, eps=args.eps, n=args.n_eval, steps=args.pgd_steps,
                      restarts=args.restarts, batch_size=args.eval_batch, state=out / f"{row}.state", progress=True)
    d = rep.to_dict()
    v = rep.variants[0]
    result = {
        "row": row, **d, "clean_acc_full_test": 100.0 * clean.clean[clean.variants[0]] / clean.n,
        "clean_n_full_test": clean.n, "eval_wall_s": round(time.time() - t, 1),
        "by_attack": {a: {format_eps(e): rep.robust_acc(v, a, e) for e in rep.eps} for a in attacks},
        "worst": {format_eps(e): w for e, w in rep.worst(v).items()},
        "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in rep.checks],
        "worst_first_batch": first_batch_worst(out / f"{row}.state", d["results"], args.eval_batch),
        "cpu": cpu_kernels.cpu_features(), "threads": torch.get_num_threads(),
    }
    report_path.write_text(json.dumps(strict(result), indent=1))
    return result


def evaluate_row_suites(row: str, model, args, out: Path) -> dict:
    """Issue 30's evaluation of one row: clean accuracy on the whole test set; the ``paper`` suite
    (PGD-20, the NRPM paper's protocol) at --paper-eps on the first --paper-n points; the
    ``standard`` suite (AutoAttack at its real strength plus, on converted rows, the report card's
    adaptive attacks at every ε, cascaded) at --eps on the first --n-eval points. Resumable (state
    files); the report is OUT/<row>.suites.json."""
    _, data, _ = MODELS[args.model]
    report_path = out / f"{row}.suites.json"
    if report_path.exists():
        return json.loads(report_path.read_text())
    t = time.time()
    clean = rs.evaluate(model, data, suite="quick", eps=[0.0], checks=False, batch_size=500)
    paper = rs.evaluate(model, data, suite="paper", eps=args.paper_eps, n=args.paper_n, batch_size=args.eval_batch,
                        state=out / f"{row}.paper.state", progress=True)
    t_paper = time.time() - t
    std = rs.evaluate(model, data, suite="standard", eps=args.eps, n=args.n_eval, batch_size=args.eval_batch,
                      state=out / f"{row}.standard.state", progress=True)
    v = std.variants[0]
    result = {
        "row": row, "clean_acc_full_test": 100.0 * clean.clean[clean.variants[0]] / clean.n, "clean_n_full_test": clean.n,
        "paper": {"n": paper.n, "clean_acc": 100.0 * paper.clean[paper.variants[0]] / paper.n,
                  "pgd20": {format_eps(e): w for e, w in paper.worst(paper.variants[0]).items()}},
        "standard": {"n": std.n, "clean_acc": 100.0 * std.clean[v] / std.n,
                     "worst": {format_eps(e): w for e, w in std.worst(v).items()},
                     "after_each_attack": {format_eps(e): {r["label"]: r["robust_acc"] for r in std.results
                                                           if r["eps"] == e and r["in_worst"] and r["model"] == v}
                                           for e in std.eps},
                     "checks": [{"name": c.name, "eps": c.eps, "passed": c.passed, "detail": c.detail} for c in std.checks],
                     "autoattack_acc": std.to_dict()["autoattack_acc"]},
        "eval_wall_s": {"paper": round(t_paper, 1), "total": round(time.time() - t, 1)},
        "cpu": cpu_kernels.cpu_features(), "threads": torch.get_num_threads(),
    }
    report_path.write_text(json.dumps(strict(result), indent=1))
    return result


def first_batch_worst(state: Path, results: list[dict], batch: int) -> dict:
    """Per ε, how many of the first ``batch`` points survive every attack (read from the per-point
    state): evaluating those points alone (``n=batch``) must give the same count, as the slow zoo
    test checks, since every batch seeds its attacks by its index."""
    st = torch.load(state, weights_only=True)
    out = {}
    for r in results:
        if r["in_worst"] and r["model"] == results[0]["model"]:
            key = r["eps_str"]
            hit = st["robust"][r["key"]][:batch].bool()
            out[key] = out.get(key, hit) & hit
    return {k: int(v.sum()) for k, v in out.items()}


def write_table(results: dict, args, out: Path) -> str:
    eps = [format_eps(e) for e in args.eps]
    used = [a for a in ATTACK_COLUMNS if any(a in r["by_attack"] for r, _ in results.values())]
    cols = ["clean (10k)"] + [f"{a} {e}" for e in eps for a in used] \
        + [f"**worst {e}**" for e in eps]
    lines = ["| row | train wall s | " + " | ".join(cols) + " | report card |", "|" + " --- |" * (len(cols) + 3)]
    for row, (r, info) in results.items():
        cells = [f"{r['clean_acc_full_test']:.1f}"]
        for e in eps:
            for a in used:
                val = r["by_attack"].get(a, {}).get(e)
                cells.append("—" if val is None else f"{val:.1f}")
        cells += [f"**{r['worst'][e]:.1f}**" for e in eps]
        failed = [c["name"] for c in r["checks"] if c["passed"] is False]
        card = "—" if not r["checks"] else ("all pass" if not failed else "FAIL: " + "; ".join(failed))
        lines.append(f"| {row} | {info.get('train_wall_s', 0)} | " + " | ".join(cells) + f" | {card} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="mlp")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-eps", type=float, default=0.3)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--adv-weight", type=float, default=0.5)
    ap.add_argument("--lr-lambda", type=float, default=0.05)
    ap.add_argument("--lr-all", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--schedule", choices=("constant", "cosine", "step"), default="cosine")
    ap.add_argument("--train-alpha", type=float, default=None, help="PGD step in pixel units (default 2.5·ε/steps)")
    ap.add_argument("--checkpoint-every", type=int, default=50, help="training checkpoint every N steps inside an epoch")
    ap.add_argument("--train-only", action="store_true", help="train (and save) the rows, evaluate nothing")
    ap.add_argument("--eval", choices=("legacy", "suites"), default="legacy",
                    help="legacy: --attacks per attack (the MNIST tables); suites: the paper suite at --paper-eps on "
                         "--paper-n points and the standard suite at --eps on --n-eval points (issue 30)")
    ap.add_argument("--paper-eps", type=parse_eps, default=(8 / 255, 16 / 255, 32 / 255))
    ap.add_argument("--paper-n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--val-n", type=int, default=1000)
    ap.add_argument("--eps", type=parse_eps, default=(0.1, 0.3))
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--pgd-steps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--attacks", default="fgsm,pgd,autoattack,square",
                    help="direct attacks of every row (transfer and bpda join on converted rows); "
                         "apgd instead of autoattack where the standard version does not fit the time")
    ap.add_argument("--eval-batch", type=int, default=250)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    (args.out / f"settings-{args.rows.replace(',', '+')}.json").write_text(json.dumps({**{k: str(v) if isinstance(v, Path) else v
                                                          for k, v in vars(args).items()},
                                                       "cpu": cpu_kernels.cpu_features(),
                                                       "torch": torch.__version__}, indent=1))
    results = {}
    for row in args.rows.split(","):
        model, info = build_row(row, args, args.out)
        if args.train_only:
            print(f"{row}: trained and saved ({info.get('train_wall_s', 0)} s)", flush=True)
            continue
        if args.eval == "suites":
            print(json.dumps(evaluate_row_suites(row, model, args, args.out))[:2000], flush=True)
            continue
        results[row] = (evaluate_row(row, model, args, args.out), info)
        print(write_table(results, args, args.out), flush=True)


if __name__ == "__main__":
    main()
