"""Model cards of the hardened zoo models: they print, their front matter is Hugging Face model-index
YAML, and their numbers are the shipped model's and its table row's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robust_surgery.cli.app import app
from robust_surgery.io.cards import card_names, read_card
from robust_surgery.model_zoo.hardened import SHIPPED

ROOT = Path(__file__).resolve().parents[2]
ROWS = {"mnist-lenet-p3": ("paradigms-full-lenet", "paradigm-3"), "mnist-lenet-at": ("paradigms-full-lenet", "adversarial-training"),
        "cifar-resnet20-at": ("paradigms-full-resnet20", "adversarial-training")}


def _front_matter(text: str) -> dict:
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_shipped_hardened_model_has_a_card_with_its_numbers(name):
    assert name in card_names()
    text = read_card(name)
    meta = _front_matter(text)
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["clean"] == pytest.approx(SHIPPED[name][1], abs=0.005)  # the shipped file's clean accuracy
    row = json.loads((ROOT / "benchmarks" / "results" / ROWS[name][0] / f"{ROWS[name][1]}.json").read_text())
    for eps, worst in row["worst"].items():
        assert metrics[f"worst-{eps}"] == pytest.approx(worst, abs=0.005)
        assert f"**{worst:.1f}**" in text
    entry = json.loads(text.split("## RobustBench entry")[1].split("```json")[1].split("```")[0])
    assert entry["robust_acc"] == row["worst"][entry["eps"]] and entry["n_examples"] == row["n_examples"]


def test_surgery_zoo_card_prints_it_and_names_the_cards_for_an_unknown_model():
    res = CliRunner().invoke(app, ["zoo", "card", "mnist-lenet-at"])
    assert res.exit_code == 0 and res.stdout == read_card("mnist-lenet-at")
    bad = CliRunner().invoke(app, ["zoo", "card", "mnist-mlp"])
    assert bad.exit_code == 1 and "error: no model card for 'mnist-mlp'; cards exist for: cifar-resnet20-at" in bad.output
