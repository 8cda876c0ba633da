"""R2DL benchmark: all-MiniLM-L6-v2 sentiment classifier -> AMP and toxicity peptides, with controls.

Rows per task (same fixed, seeded, stratified split; accuracy and ROC AUC on the test part):
R2DL with k-sparse Θ (pretrained encoder), R2DL with dense Θ (no OMP projection), R2DL with
k-sparse Θ on a random-weight encoder (same architecture), and the amino-acid composition
(+ dipeptide) logistic regressions, trained on the full training part and on the same
subsample R2DL trains on.

    python benchmarks/reprogramming_r2dl.py            # writes benchmarks/results/reprogramming_r2dl.json
    python benchmarks/reprogramming_r2dl.py --quick    # small budget (smoke run, a few minutes)

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
VARIANTS = ({"dense": False, "random_encoder": False}, {"dense": True, "random_encoder": False},
            {"dense": False, "random_encoder": True})


def run(quick: bool = False, tasks=TASKS, k: int = 10, seed: int = 0, progress: bool = False) -> list[dict]:
    """One dict per table row: method, task (= target), variant, accuracy and auc (fractions),
    clean_acc and auc_pct (the same in percent), n_train, n_test, seconds, notes."""
    from robust_surgery.reprogram.r2dl import R2DLConfig, composition_baseline, run_r2dl, split_task
    from robust_surgery.data.sequences import load_peptide_task

    budget = QUICK if quick else FULL
    rows = []
    for name in tasks:
        task = load_peptide_task(name)
        full_train, test = split_task(task, R2DLConfig(seed=seed, n_test=budget["n_test"]))
        small_train, _ = split_task(task, R2DLConfig(seed=seed, n_train=budget["n_train"], n_test=budget["n_test"]))
        for train in (full_train, small_train):
            for dip in (False, True):
                res = composition_baseline(train, test, dipeptides=dip, seed=seed)
                rows.append({"method": "composition LR", "task": name,
                             "variant": "amino acids + dipeptides" if dip else "amino acids",
                             "accuracy": res["accuracy"], "auc": res["auc"], "n_train": len(train),
                             "n_test": res["n"], "seconds": res["seconds"],
                             "notes": "scikit-learn LogisticRegression on standardised composition features"})
        for v in VARIANTS:
            cfg = R2DLConfig(k=k, seed=seed, **budget, **v)
            result = run_r2dl("zoo:minilm-sentiment", task, cfg, progress=progress)
            s = result.summary()
            rows.append({"method": "R2DL", "task": name, "variant": s["variant"], "accuracy": s["accuracy"],
                         "auc": s["auc"], "n_train": s["task"]["n_train"], "n_test": s["task"]["n_test"],
                         "seconds": s["seconds"], "steps": s["steps"], "first_loss": s["first_loss"],
                         "last_loss": s["last_loss"], "config": asdict(cfg),
                         "notes": f"source zoo:minilm-sentiment, one-to-one mapping, max_len {cfg.max_len}"})
            print(f"{name:9s} {rows[-1]['variant']:28s} acc {s['accuracy']:.3f} auc {s['auc']:.3f} "
                  f"{s['seconds']:.0f}s", file=sys.stderr, flush=True)
    for r in rows:  # the column names of benchmarks/reprogramming.py's table (percent)
        r.update(target=r["task"], source="zoo:minilm-sentiment" if r["method"] == "R2DL" else "-",
                 clean_acc=100.0 * r["accuracy"], auc_pct=None if r["auc"] is None else 100.0 * r["auc"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small budget (512 training sequences, 400 test)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/reprogramming_r2dl[-quick].json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    rows = run(quick=args.quick, k=args.k, progress=False)
    out = args.out or RESULTS / f"reprogramming_r2dl{'-quick' if args.quick else ''}.json"
    from robust_surgery._files import atomic_path

    record = {"rows": rows, "quick": args.quick, "seconds": time.time() - t0, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    with atomic_path(out, make_parents=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'task':9s} {'method':15s} {'variant':28s} {'train':>6s} {'test':>6s} {'acc':>6s} {'auc':>6s} {'s':>6s}")
    for r in rows:
        print(f"{r['task']:9s} {r['method']:15s} {r['variant']:28s} {r['n_train']:6d} {r['n_test']:6d} "
              f"{r['accuracy']:6.3f} {r['auc']:6.3f} {r['seconds']:6.0f}")
    print(f"wrote {out} ({record['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
