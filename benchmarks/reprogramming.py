"""Reprogramming table: AR and BAR on cifar-resnet20 → MNIST, original vs hardened sources (+ R2DL).

Image part (this file): the source is the pretrained CIFAR-10 ResNet-20, as released
(``original``), NRPM-converted by paradigm 1 (``p1``: the layers of ``--convert``, L1, K = 1,
λ = 0.5) and, from p1, paradigm 2 (``p2``: λ fine-tuned with FGSM batches at 8/255 on
``--p2-n`` CIFAR-10 training images). For each source: the source's own CIFAR-10 clean and PGD
accuracy, then AR (one-to-one mapping) and BAR (frequency mapping, low-dimensional program,
focal loss) on MNIST digits resized to ``--data-size`` px in the 32×32 canvas, each reported
with the target task's clean, FGSM and PGD-20 accuracy (L∞ on the [0, 1] digit, attacks on the
whole pipeline program → source → mapping), CPU seconds and, for BAR, queries and their cost.
Controls: AR on an untrained ResNet-20, BAR with a random mapping.

Text part (``--part text|all``): imports ``benchmarks/reprogramming_r2dl.py`` (the R2DL
benchmark) when it exists and adds its ``run(quick)`` rows to the same table and JSON.

    nice -n 10 python benchmarks/reprogramming.py [--part image|text|all] [--quick]
        [--n-train 8000] [--epochs 2] [--bar-steps 150] [--q 10] [--n-test 200] [--out FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import robust_surgery as rs
from robust_surgery._files import atomic_path
from robust_surgery.reprogram.ar import ARConfig, reprogram_ar
from robust_surgery.reprogram.bar import BARConfig, reprogram_bar
from robust_surgery.reprogram.pipeline import load_target, target_accuracy

HERE = Path(__file__).resolve().parent
SOURCE = "zoo:cifar-resnet20"
NRPM = dict(norm="L1", K=1, lam=0.5)


def _log(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def _sources(args) -> list[tuple[str, torch.nn.Module, dict]]:
    """(variant name, source model, its CIFAR-10 clean / PGD accuracy and preparation time)."""
    base = rs.load_model(SOURCE)
    include = [s for s in args.convert.split(",") if s]
    out = [("original", base, {})]
    p1 = rs.convert(base, 1, include=include, **NRPM)
    out.append((f"p1 ({args.convert})", p1, {}))
    if args.p2_n:
        t = time.process_time()
        p2, _ = rs.finetune(rs.convert(base, 1, include=include, **NRPM), "cifar10", 2, adversarial="fgsm",
                            eps=8 / 255, epochs=1, n_train=args.p2_n, val_n=500, lr=0.05, optimizer="adam",
                            batch_size=64, progress=False)
        lam = {n: round(m.lam_value, 3) for n, m in rs.nrpm_layers(p2)}
        out.append((f"p2 ({args.convert})", p2, {"prep_cpu_s": round(time.process_time() - t, 1), "lam": lam}))
    for _, model, info in out:
        rep = rs.evaluate(model, "cifar10", attacks=("pgd",), eps=(8 / 255,), n=args.n_cifar, steps=args.pgd_steps,
                          checks=False, batch_size=100)
        v = rep.variants[0]
        info.update(source_cifar_clean=100.0 * rep.clean[v] / rep.n, source_cifar_pgd=rep.robust_acc(v, "pgd", 8 / 255))
    return out


def _target_row(model, test, args) -> dict:
    acc = target_accuracy(model, *test, attacks=("fgsm", "pgd"), eps=args.eps, steps=args.pgd_steps)
    row = {"clean_acc": acc["clean_acc"], "n_test": acc["n_examples"]}
    for attack, by_eps in acc["robust_acc"].items():
        for e, a in by_eps.items():
            row[f"{attack}@{e}"] = a
    return row


def run_image(args, add) -> None:
    """AR and BAR rows for every source variant, then the controls (see the module docstring).

    ``add(row)`` receives each row as soon as it is measured.
    """
    torch.manual_seed(0)
    x, y = load_target("mnist", "train", n=args.n_train)
    test = load_target("mnist", "test", n=args.n_test)
    ar_cfg = ARConfig(epochs=args.epochs, lr=args.ar_lr, batch_size=args.ar_batch)
    bar_cfg = BARConfig(steps=args.bar_steps, q=args.q, beta=0.05, lr=0.05, batch_size=args.bar_batch,
                        price_per_1000=args.price)

    def ar(variant, source, base, **info):
        t = time.process_time()
        model, rep = reprogram_ar(source, x, y, ar_cfg, data_size=args.data_size)
        add({**base, "variant": variant, "method": "AR", "mapping": "one-to-one", "n_train": len(x),
             "epochs": args.epochs, "d": rep["d"], "train_cpu_s": round(time.process_time() - t, 1), **info,
             **_target_row(model, test, args)})

    def bar(variant, source, base, mapping="frequency"):
        t = time.process_time()
        model, rep = reprogram_bar(source, x, y, bar_cfg, data_size=args.data_size, low_dim=args.low_dim,
                                   mapping=mapping)
        add({**base, "variant": variant, "method": "BAR" if mapping == "frequency" else f"BAR ({mapping} mapping)",
             "mapping": mapping, "n_train": len(x), "steps": rep["steps"], "q": args.q, "d": rep["d"],
             "queries": rep["queries"], "cost": rep["cost"], "price_per_1000": args.price,
             "train_cpu_s": round(time.process_time() - t, 1), **_target_row(model, test, args)})

    common = {"part": "image", "source": SOURCE, "target": "mnist"}
    sources = _sources(args)
    for variant, source, info in sources:  # AR rows first: on a busy machine they are the headline
        ar(variant, source, {**common, **info})
    for variant, source, info in sources:
        bar(variant, source, {**common, **info})
    original = sources[0][1]
    bar("original", original, {**common, **sources[0][2]}, mapping="random")
    torch.manual_seed(0)
    ar("untrained (control)", rs.build_arch(SOURCE, pretrained=False), common)


def run_text(quick: bool) -> list[dict]:
    """Rows of ``benchmarks/reprogramming_r2dl.py`` (R2DL), or none when that file is not there."""
    path = HERE / "reprogramming_r2dl.py"
    if not path.exists():
        print(f"note: {path.name} not found; no R2DL rows", file=sys.stderr)
        return []
    spec = importlib.util.spec_from_file_location("reprogramming_r2dl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [{"part": "text", **row} for row in module.run(quick=quick)]


_FIRST = ("part", "method", "variant", "source", "target", "mapping", "clean_acc")


def print_table(rows: list[dict]) -> None:
    """All rows as one Markdown table on stdout (columns: the union of the rows' scalar fields)."""
    cols = [c for c in _FIRST if any(c in r for r in rows)]
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("image", "text", "all"), default="image")
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks that everything runs")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ar-lr", type=float, default=0.1)
    ap.add_argument("--ar-batch", type=int, default=32)
    ap.add_argument("--bar-steps", type=int, default=150)
    ap.add_argument("--bar-batch", type=int, default=16)
    ap.add_argument("--q", type=int, default=10)
    ap.add_argument("--low-dim", type=int, default=8)
    ap.add_argument("--data-size", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-cifar", type=int, default=100, help="CIFAR-10 test points for the sources' own accuracy")
    ap.add_argument("--eps", default="0.1")
    ap.add_argument("--pgd-steps", type=int, default=20)
    ap.add_argument("--convert", default="linear", help="layers of the paradigm-1/2 source (comma-separated patterns)")
    ap.add_argument("--p2-n", type=int, default=2000, help="CIFAR-10 images for paradigm 2 (0: skip it)")
    ap.add_argument("--price", type=float, default=1.0, help="price of 1000 queries")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.epochs, args.bar_steps, args.q, args.n_test, args.n_cifar, args.p2_n, args.pgd_steps = \
            128, 1, 2, 3, 32, 16, 128, 3
    args.eps = tuple(float(e) for e in args.eps.split(","))
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    out = args.out or HERE / "results" / ("reprogramming_image.json" if args.part == "image"
                                          else f"reprogramming_image_{args.part}.json")
    settings = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()}
    rows: list[dict] = []

    def write(complete: bool) -> None:  # after every row, so a stopped run keeps what it measured
        with atomic_path(out, make_parents=True) as tmp:
            tmp.write_text(json.dumps({"settings": settings, "complete": complete, "rows": rows,
                                       "wall_s": round(time.time() - t0, 1),
                                       "cpu_s": round(time.process_time() - c0, 1)}, indent=2) + "\n")

    def add(row: dict) -> None:
        rows.append(row)
        _log(row)
        write(False)

    if args.part in ("image", "all"):
        run_image(args, add)
    if args.part in ("text", "all"):
        for row in run_text(args.quick):
            add(row)
    write(True)
    print_table(rows)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
