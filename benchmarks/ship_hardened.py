"""Write a hardened zoo model's shipped file from its paradigm-table row (a maintainer's tool).

The row's model (``benchmarks/paradigms_full.py`` trains it with the zoo recipe, through
``robust_surgery.model_zoo.hardened.harden``) is loaded into the zoo architecture, its clean
accuracy is counted on the whole test set, and its state dict is written to
``model_zoo/checkpoints/NAME.safetensors`` with the recipe in the metadata. Prints the SHA-256
and the accuracy for ``SHIPPED`` in ``model_zoo/hardened.py``.

    python benchmarks/ship_hardened.py mnist-lenet-at benchmarks/results/paradigms-full-lenet/adversarial-training.safetensors
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import robust_surgery as rs
from robust_surgery.data.datasets import load_dataset
from robust_surgery.model_zoo.hardened import HARDENED, hardened_architecture
from robust_surgery.model_zoo.train import evaluate_accuracy, save_state_dict_safetensors
from robust_surgery.io.zoo import get_entry, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(HARDENED))
    ap.add_argument("row", type=Path, help="the table row's model file (OUT/<row>.safetensors)")
    args = ap.parse_args()
    recipe = HARDENED[args.name]
    model = hardened_architecture(recipe)
    model.load_state_dict(rs.load(args.row).state_dict(), strict=True)
    x, y = load_dataset(get_entry(recipe.base).dataset, "test").tensors
    correct, n = evaluate_accuracy(model.eval(), x, y)
    meta = {**{k: json.dumps(v) for k, v in asdict(recipe).items()}, "test_correct": correct, "test_n": n,
            "made_by": f"benchmarks/paradigms_full.py row {args.row.stem} (harden with the zoo recipe)"}
    out = save_state_dict_safetensors(model, ROOT / "model_zoo" / "checkpoints" / f"{args.name}.safetensors", meta)
    print(f"{args.name}: clean {100.0 * correct / n:.2f} % ({correct}/{n}), sha256 {sha256_file(out)}, "
          f"{out.stat().st_size} bytes -> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
