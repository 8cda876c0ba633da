"""R2DL benchmark: all-MiniLM-L6-v2 sentiment classifier -> AMP and toxicity peptides, with controls.

Rows per task (same fixed, seeded, stratified split; accuracy and ROC AUC on the test part):
R2DL with k-sparse Θ (pretrained encoder), R2DL with dense Θ (no OMP projection), R2DL with
k-sparse Θ on a random-weight encoder (same architecture), and the amino-acid composition
(+ dipeptide) logistic regressions, trained on the full training part and on the same
subsample R2DL trains on.

    python benchmarks/reprogramming_r2dl.py            # writes benchmarks/results/reprogramming_r2dl.json
    python benchmarks/reprogramming_r2dl.py --quick    # small budget (smoke run, a few minutes)
    python benchmarks/reprogramming_r2dl.py --budget all-data --seeds 0,1,2 --tasks amp,toxicity,hemolysis \
        --device cuda --out benchmarks/results/reprogramming_r2dl-full.json   # the issue's full budget

The classical baselines (:func:`~robust_surgery.reprogram.r2dl.classical_baselines`: composition
logistic regressions, and a random forest and gradient boosting on composition + dipeptides +
physico-chemical descriptors) are fitted per seed on the whole training part and on the subsample.

``benchmarks/reprogramming.py`` imports :func:`run` for the README's reprogramming table. CPU
only, one thread (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("amp", "toxicity")
# Full budget: 2048 training sequences, one epoch (64 Adam steps of 32), whole test part.
FULL = {"n_train": 2048, "n_test": None, "epochs": 1, "max_len": 64}
QUICK = {"n_train": 512, "n_test": 400, "epochs": 1, "max_len": 48}
# The full budget: every training peptide, 3 epochs, 64 residues (longer ones are cut).
ALL_DATA = {"n_train": None, "n_test": None, "epochs": 3, "max_len": 64}
BUDGETS = {"quick": QUICK, "full": FULL, "all-data": ALL_DATA}
VARIANT_NAMES = {"sparse": {"dense": False, "random_encoder": False}, "dense": {"dense": True, "random_encoder": False},
                 "random": {"dense": False, "random_encoder": True}}
VARIANTS = tuple(VARIANT_NAMES.values())


def run(quick: bool = False, tasks=TASKS, k: int = 10, seed: int = 0, progress: bool = False, *,
        budget: str | None = None, seeds=None, device: str = "cpu", overrides: dict | None = None,
        partial: Path | None = None, variants=VARIANTS, baselines: bool = True) -> list[dict]:
    """One dict per table row: method, task (= target), variant, seed, accuracy and auc (fractions),
    clean_acc and auc_pct (the same in percent), n_train, n_test, seconds, notes. ``budget``: a
    key of ``BUDGETS`` (default ``quick`` when ``quick``, else ``full``); ``seeds``: the split and
    training seeds (default ``(seed,)``); ``overrides``: budget fields to replace (``epochs``,
    ``max_len``); ``partial``: a JSON-lines file each row is appended to as it finishes, so a long
    run that stops keeps what it measured; ``variants``: the R2DL variants to run (default all
    three); ``baselines``: also fit the classical baselines."""
    from robust_surgery.reprogram.r2dl import R2DLConfig, classical_baselines, run_r2dl, split_task
    from robust_surgery.data.sequences import load_peptide_task

    budget = {**BUDGETS[budget or ("quick" if quick else "full")], **(overrides or {})}
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        if partial is not None:
            with open(partial, "a") as f:
                f.write(json.dumps(row) + "\n")
    for name in tasks:
        task = load_peptide_task(name)
        for sd in seeds or (seed,):
            full_train, test = split_task(task, R2DLConfig(seed=sd, n_test=budget["n_test"]))
            trains = [full_train]
            if budget["n_train"] is not None:
                trains.append(split_task(task, R2DLConfig(seed=sd, n_train=budget["n_train"], n_test=budget["n_test"]))[0])
            for train in trains if baselines else ():
                for res in classical_baselines(train, test, seed=sd):
                    keep({"method": res["method"], "task": name, "variant": "baseline (scikit-learn)", "seed": sd,
                          "accuracy": res["accuracy"], "auc": res["auc"], "n_train": len(train),
                          "n_test": res["n"], "seconds": res["seconds"], "notes": "scikit-learn"})
            for v in variants:
                cfg = R2DLConfig(k=k, seed=sd, **budget, **v)
                result = run_r2dl("zoo:minilm-sentiment", task, cfg, progress=progress, device=device)
                s = result.summary()
                keep({"method": "R2DL", "task": name, "variant": s["variant"], "seed": sd, "accuracy": s["accuracy"],
                      "auc": s["auc"], "n_train": s["task"]["n_train"], "n_test": s["task"]["n_test"],
                      "seconds": s["seconds"], "steps": s["steps"], "first_loss": s["first_loss"],
                      "last_loss": s["last_loss"], "config": asdict(cfg),
                      "notes": f"source zoo:minilm-sentiment, one-to-one mapping, max_len {cfg.max_len}"})
                print(f"{name:9s} seed {sd} {rows[-1]['variant']:28s} acc {s['accuracy']:.3f} auc {s['auc']:.3f} "
                      f"{s['seconds']:.0f}s", file=sys.stderr, flush=True)
    for r in rows:  # the column names of benchmarks/reprogramming.py's table (percent)
        r.update(target=r["task"], source="zoo:minilm-sentiment" if r["method"] == "R2DL" else "-",
                 clean_acc=100.0 * r["accuracy"], auc_pct=None if r["auc"] is None else 100.0 * r["auc"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budget (512 training sequences, 400 test)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--budget", choices=sorted(BUDGETS), help="default: quick with --quick, else full")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (split and training)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, help="replace the budget's epochs")
    ap.add_argument("--max-len", type=int, help="replace the budget's max_len (residues kept per sequence)")
    ap.add_argument("--variants", default="sparse,dense,random",
                    help="R2DL variants: sparse (k-sparse Θ), dense (dense Θ), random (k-sparse Θ, random-weight encoder)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the classical baselines")
    ap.add_argument("--partial", type=Path, help="also append each row to this JSON-lines file as it finishes")
    ap.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/reprogramming_r2dl[-quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    rows = run(quick=args.quick, tasks=args.tasks.split(","), k=args.k, progress=False, budget=args.budget,
               seeds=[int(v) for v in args.seeds.split(",")], device=args.device, partial=args.partial,
               variants=[VARIANT_NAMES[v] for v in args.variants.split(",")], baselines=not args.no_baselines,
               overrides={k: v for k, v in (("epochs", args.epochs), ("max_len", args.max_len)) if v is not None})
    out = args.out or RESULTS / f"reprogramming_r2dl{'-quick' if args.quick else ''}.json"
    from robust_surgery._files import atomic_path

    record = {"rows": rows, "quick": args.quick, "budget": args.budget or ("quick" if args.quick else "full"), "seconds": time.time() - t0, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    with atomic_path(out, make_parents=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'task':9s} {'method':50s} {'variant':28s} {'seed':>4s} {'train':>6s} {'test':>6s} {'acc':>6s} {'auc':>6s} {'s':>6s}")
    for r in rows:
        print(f"{r['task']:9s} {r['method']:50s} {r['variant']:28s} {r['seed']:4d} {r['n_train']:6d} {r['n_test']:6d} "
              f"{r['accuracy']:6.3f} {r['auc']:6.3f} {r['seconds']:6.0f}")
    print(f"wrote {out} ({record['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
