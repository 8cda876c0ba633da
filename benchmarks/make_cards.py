"""Write model_zoo/cards/<name>.md for a hardened zoo model from its paradigm-table row's records.

    python benchmarks/make_cards.py mnist-lenet-p3 benchmarks/results/paradigms-full-lenet paradigm-3

Reads OUT/<row>.train.json (recipe, training time) and OUT/<row>.json (the evaluation) and, for the
hardware, OUT/settings*.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust_surgery.io.cards import render_card
from robust_surgery.io.zoo import get_entry

ROOT = Path(__file__).resolve().parents[1]
_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "apgd": "APGD-CE + APGD-DLR", "autoattack": "AutoAttack-10 (torchattacks' default)",
          "square": "Square", "transfer": "transfer from λ = 1 (PGD)", "bpda": "BPDA (PGD)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("out", type=Path)
    ap.add_argument("row")
    args = ap.parse_args()
    train = json.loads((args.out / f"{args.row}.train.json").read_text())
    ev = json.loads((args.out / f"{args.row}.json").read_text())
    settings = next(iter(sorted(args.out.glob("settings*.json"))), None)
    cpu = (json.loads(settings.read_text()) if settings else {}).get("cpu", ev.get("cpu", {}))
    s = json.loads(settings.read_text()) if settings else {}
    protocol = (f"FGSM, PGD-{s.get('pgd_steps', '?')} with {s.get('restarts', '?')} restarts, "
                + ", ".join(_NAMES.get(a, a) for a in ev["by_attack"] if a not in ("fgsm", "pgd"))
                + "; every attack on every point, worst case per point (measured before the standard suite)")
    card = render_card(
        args.name, description=get_entry(args.name).description, dataset=ev["dataset"], recipe=train["recipe"],
        training={"wall_s": train["train_wall_s"], "hardware": f"{cpu.get('model', '?')} ({cpu.get('isa', '?')})",
                  "threads": ev.get("threads", 1)},
        evaluation={"clean_acc": ev["clean_acc_full_test"], "clean_n": ev["clean_n_full_test"], "n": ev["n_examples"],
                    "threat_model": ev["threat_model"], "protocol": protocol,
                    "attacks": {_NAMES.get(a, a): v for a, v in ev["by_attack"].items()}, "worst": ev["worst"]})
    path = ROOT / "model_zoo" / "cards" / f"{args.name}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(card, encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
