"""BAR's accuracy against queries: cifar-resnet20 → MNIST, for a few settings, up to millions of queries.

Why did BAR barely move (20–27 % at 34 k queries, no better than a random mapping)? Each row of
``--settings`` (``q:lr:low_dim:beta:batch[:gamma[:mapping]]``; γ = 2 (focal, class-balanced) and
the frequency mapping unless given; γ = 0 is the plain cross-entropy; mapping ``ilm`` re-solves it
once per pass over the training digits, its queries counted) trains one program by zeroth-order steps until its
query budget, logging every ``--log-every`` steps the held-out accuracy on ``--n-test`` test
digits (evaluated with the source directly: not counted as queries) and the queries spent. AR
on the same digits (``--ar``) gives the white-box reference, with a program of each side in
``--ar-low-dims`` (0: full size) so BAR's bound from the program's dimension is measured apart
from its bound from the gradient estimate. Rows go to ``--out`` (JSON lines,
one per setting, resumable); ``--plot`` draws accuracy against queries.

    nice -n 10 python benchmarks/bar_curve.py --out benchmarks/results/bar_curve-DATE.jsonl \
        --settings 10:0.05:8:0.05:32,50:0.1:4:0.05:32 --budget 2000000 [--ar] [--plot curve.png]
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
from robust_surgery.nn.backends.c import cpu_features  # noqa: E402
from robust_surgery.reprogram.ar import ARConfig, reprogram_ar  # noqa: E402
from robust_surgery.reprogram.bar import BARConfig, train_bar  # noqa: E402
from robust_surgery.reprogram.pipeline import (ReprogrammedModel, choose_mapping, load_target,  # noqa: E402
                                               source_canvas, target_accuracy)
from robust_surgery.reprogram.program import CanvasSpec, Program  # noqa: E402
from robust_surgery.reprogram.query import QueryOracle  # noqa: E402


def bar_row(setting: str, args, x, y, xt, yt) -> dict:
    parts = setting.split(":")
    q, lr, low_dim, beta, batch = parts[:5]
    q, low_dim, batch, lr, beta = int(q), int(low_dim), int(batch), float(lr), float(beta)
    gamma = float(parts[5]) if len(parts) > 5 else 2.0
    mapping = parts[6] if len(parts) > 6 else "frequency"
    per_step = batch * (q + 1)
    steps = max(1, (args.budget - len(x) - 1) // per_step)
    cfg = BARConfig(steps=steps, q=q, beta=beta, lr=lr, batch_size=batch, gamma=gamma, class_balance=gamma > 0,
                    decay=0.96, decay_every=max(1, steps // 20), seed=0, budget=args.budget)
    torch.manual_seed(0)
    source = rs.build_arch("zoo:cifar-resnet20", pretrained=True).eval()
    oracle = QueryOracle(source, budget=cfg.budget)
    program = Program(CanvasSpec(source_canvas(source), args.data_size, x.shape[1]), low_dim or None)
    n_source = oracle(program(x[:1])).shape[-1]
    table = choose_mapping(mapping, y, 10, n_source, seed=0, probs_fn=oracle, program=program, x=x)
    model = ReprogrammedModel(source, program, table)

    def held_out(record):
        return {"test_acc": target_accuracy(model, xt, yt)["clean_acc"]}

    t0 = time.time()
    passes = -(-len(x) // batch)  # steps per pass over the training digits (ILM re-solves once a pass)
    result = train_bar(program, table, oracle, x, y, cfg, progress=True, remap_every=passes if mapping == "ilm" else None,
                       log_every=max(1, steps // args.points), on_log=held_out)
    return {"key": f"bar-{setting}-b{args.budget}", "method": "BAR", "setting": setting, "q": q, "lr": lr,
            "low_dim": low_dim, "d": program.d, "beta": beta, "batch": batch, "gamma": gamma, "mapping": mapping,
            "remaps": result["remaps"], "steps": result["steps"],
            "queries": result["queries"], "mapping_queries": len(x) + 1, "curve": result["history"],
            "test_acc": result["history"][-1]["test_acc"] if result["history"] else None,
            "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--settings", default="10:0.05:8:0.05:32,50:0.1:4:0.05:32")
    ap.add_argument("--budget", type=int, default=1_000_000)
    ap.add_argument("--points", type=int, default=10, help="held-out evaluations per setting")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--data-size", type=int, default=16)
    ap.add_argument("--ar", action="store_true", help="also AR on the same digits (white-box reference)")
    ap.add_argument("--ar-low-dims", default="0", help="AR program sides to run with --ar (0: full size)")
    ap.add_argument("--ar-epochs", type=int, default=2)
    ap.add_argument("--ar-mapping", default="one-to-one", help="AR's label mapping (BAR's rows use frequency)")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    done = {r["key"] for r in rows}
    x, y = load_target("mnist", "train", n=args.n_train)
    xt, yt = load_target("mnist", "test", n=args.n_test)
    cpu = cpu_features()
    todo = [("bar", s) for s in args.settings.split(",") if s] + \
        ([("ar", int(r)) for r in args.ar_low_dims.split(",")] if args.ar else [])
    for kind, setting in todo:
        if kind == "bar":
            key = f"bar-{setting}-b{args.budget}"
        else:  # the first AR rows (full program, 2 epochs) kept their short key
            key = f"ar-n{args.n_train}" + (f"-r{setting}" if setting else "") + \
                (f"-e{args.ar_epochs}" if args.ar_epochs != 2 else "") + \
                (f"-{args.ar_mapping}" if args.ar_mapping != "one-to-one" else "")
        if key in done:
            continue
        if kind == "bar":
            row = bar_row(setting, args, x, y, xt, yt)
        else:
            torch.manual_seed(0)
            t0 = time.time()
            model, rep = reprogram_ar(rs.build_arch("zoo:cifar-resnet20", pretrained=True), x, y,
                                      ARConfig(epochs=args.ar_epochs, lr=0.1, batch_size=32), data_size=args.data_size,
                                      low_dim=setting or None, mapping=args.ar_mapping, device="cpu")
            row = {"key": key, "method": "AR", "low_dim": setting, "d": rep["d"], "epochs": args.ar_epochs,
                   "mapping": args.ar_mapping,
                   "test_acc": target_accuracy(model, xt, yt)["clean_acc"], "wall_s": round(time.time() - t0, 1)}
        row.update(cpu=cpu, n_train=len(x), n_test=len(xt), threads=torch.get_num_threads())
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{key}: {row['test_acc']} %", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5))
        ar_rows = [r for r in rows if r["method"] == "AR" and r.get("mapping") == args.ar_mapping
                   and r.get("epochs", 2) == args.ar_epochs]
        for r in rows:
            if r["method"] == "BAR":
                ax.plot([p["queries"] for p in r["curve"]], [p["test_acc"] for p in r["curve"]], marker="o",
                        label=f"BAR d={r['d']} q={r['q']} lr={r['lr']} γ={r.get('gamma', 2.0):g} {r.get('mapping', 'frequency')}")
        for r in ar_rows:  # white-box references at each program size, labelled on the right
            ax.axhline(r["test_acc"], linestyle="--", color="grey", linewidth=0.8)
            ax.annotate(f"AR d={r.get('d', 3072)}", (1.0, r["test_acc"]), xycoords=("axes fraction", "data"),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("queries")
        ax.set_ylabel("MNIST test accuracy (%)")
        ax.set_title(f"BAR on cifar-resnet20 → MNIST; dashed: white-box AR, {args.ar_mapping}, {args.ar_epochs} epochs",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
