"""Figures and RobustBench-format JSON from the full-data paradigm tables of paradigms_full.py.

For every table folder given: ``docs/img/paradigms-<name>.png`` (worst-case accuracy against ε,
one line per row, ε = 0 the clean accuracy on the evaluated points) and
``benchmarks/results/robustbench/<name>-<row>.json`` per row, and ``<table>/table.md`` (every row
present, as ``paradigms_full.py`` writes it), in RobustBench's model-info
fields (``clean_acc`` on the whole test set, ``autoattack_acc`` at the headline ε) plus ours
(``worst_case_acc``: per point, over every attack run; ``n_eval``; the attacks and the protocol).

    python benchmarks/paradigms_report.py benchmarks/results/paradigms-full-mlp benchmarks/results/paradigms-full-lenet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust_surgery.evaluation.budgets import parse_eps
from robust_surgery.evaluation.plot import plot_curves

ROOT = Path(__file__).resolve().parents[1]
ROW_ORDER = ("original", "paradigm-1", "paradigm-2", "paradigm-3", "adversarial-training")


def load_rows(table: Path) -> dict[str, dict]:
    """The row reports of one table folder, in the table's order."""
    rows = {}
    for name in ROW_ORDER:
        f = table / f"{name}.json"
        if f.exists():
            rows[name] = json.loads(f.read_text())
    return rows


def robustbench_entry(model: str, row: str, r: dict, settings: dict) -> dict:
    """One row in RobustBench's model-info fields, with the worst case and the protocol added."""
    head = r["eps"]
    attacks = sorted({x["attack"] if x["source"] == "direct" else x["source"] for x in r["results"]})
    return {
        "name": f"{model} {row}", "architecture": r["architecture"], "dataset": r["dataset"],
        "threat_model": r["threat_model"], "eps": head, "clean_acc": f"{r['clean_acc_full_test']:.2f}",
        "reported": None, "autoattack_acc": None if r.get("autoattack_acc") is None else f"{r['autoattack_acc']:.2f}",
        "worst_case_acc": f"{r['worst'][head]:.2f}", "n_eval": r["n_examples"], "additional_data": False,
        "number_forward_passes": 1,
        "footnote": (f"clean_acc on the whole test set ({r['clean_n_full_test']} points); robust numbers on the first "
                     f"{r['n_examples']} test points; worst_case_acc per point over {', '.join(attacks)} "
                     f"(PGD-{settings.get('pgd_steps')} x {settings.get('restarts')} restarts); "
                     f"benchmarks/paradigms_full.py, robust-surgery"),
        "by_eps": {e: {"worst": w, **{a: v[e] for a, v in r["by_attack"].items() if e in v}}
                   for e, w in r["worst"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tables", nargs="+", type=Path)
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "robustbench"
    out.mkdir(parents=True, exist_ok=True)
    for table in args.tables:
        model = table.name.removeprefix("paradigms-full-")
        settings = json.loads((table / "settings.json").read_text())
        rows = load_rows(table)
        curves = {}
        for row, r in rows.items():
            first = r["results"][0]["model"]
            curves[row] = {0.0: r["models"][first]["clean_acc"], **{parse_eps(e)[0]: w for e, w in r["worst"].items()}}
            entry = robustbench_entry(model, row, r, settings)
            (out / f"{model}-{row}.json").write_text(json.dumps(entry, indent=1) + "\n")
        if rows:  # the markdown table of every row present (paradigms_full writes it as it goes)
            from types import SimpleNamespace

            from paradigms_full import write_table  # beside this script

            infos = {row: json.loads((table / f"{row}.train.json").read_text()) if (table / f"{row}.train.json").exists()
                     else {} for row in rows}
            write_table({row: (r, infos[row]) for row, r in rows.items()},
                        SimpleNamespace(eps=parse_eps(",".join(next(iter(rows.values()))["worst"]))), table)
        png = plot_curves(curves, ROOT / "docs" / "img" / f"paradigms-{model}.png",
                          title=f"{model}: worst case over the attacks, first {settings['n_eval']} test points")
        print(f"{table}: {len(rows)} rows -> {png.relative_to(ROOT)}, {out.relative_to(ROOT)}/{model}-*.json")


if __name__ == "__main__":
    main()
