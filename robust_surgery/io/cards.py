"""Model cards of the hardened zoo models: recipe, training cost, evaluation table, publishable as is.

A card is ``model_zoo/cards/<name>.md``: Markdown with Hugging Face ``model-index`` YAML front
matter (one result per attack and ε, the worst case included, so the Hub shows them) and a
RobustBench-style JSON block (``clean_acc``, ``autoattack_acc``, ``robust_acc`` at the headline ε,
``threat_model``, ``eps``, ``n_examples``...). :func:`render_card` writes one from a row's
training and evaluation records (``benchmarks/make_cards.py``); :func:`read_card` is what
``surgery zoo card NAME`` prints.
"""
from __future__ import annotations

import json
from importlib import resources

from robust_surgery.errors import InvalidInputError

__all__ = ["card_names", "read_card", "render_card"]

_DATASETS = {"mnist": ("MNIST", "mnist"), "cifar10": ("CIFAR-10", "cifar10")}


def _slug(text: str) -> str:
    """A metric type: lower case, words joined by '-' (``robust-pgd-8/255``)."""
    import re

    return re.sub(r"[^a-z0-9/.]+", "-", text.lower().replace("λ", "lambda")).strip("-")


def _yaml_str(text: str) -> str:
    return json.dumps(str(text), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def render_card(name: str, *, description: str, dataset: str, recipe: dict, training: dict, evaluation: dict) -> str:
    """The card of zoo model ``name`` as Markdown.

    ``recipe``: the training settings; ``training``: ``wall_s``, ``hardware``, ``threads`` (what it
    cost, measured); ``evaluation``: ``clean_acc`` (percent, on ``clean_n`` points), ``n`` (attacked
    points), ``threat_model``, ``protocol`` (words), ``attacks`` {attack: {ε label: percent}},
    ``worst`` {ε label: percent} and optionally ``autoattack`` {ε label: percent}. ε labels as
    ``format_eps`` writes them (``0.3``, ``8/255``)."""
    pretty, ds_type = _DATASETS.get(dataset, (dataset, dataset))
    ev = evaluation
    eps_labels = list(ev["worst"])
    results = [("clean accuracy", "clean", ev["clean_acc"])]
    for e in eps_labels:
        for attack, by_eps in ev["attacks"].items():
            if e in by_eps:
                results.append((f"robust accuracy, {attack}, ε = {e}", _slug(f"robust {attack} {e}"), by_eps[e]))
        results.append((f"robust accuracy, worst case over every attack, ε = {e}", _slug(f"worst {e}"), ev["worst"][e]))
    lines = ["---", "library_name: robust-surgery", "tags:", "- adversarial-robustness", "- nrpm", "model-index:",
             f"- name: {_yaml_str(name)}", "  results:", "  - task:", "      type: image-classification",
             "    dataset:", f"      name: {_yaml_str(pretty)}", f"      type: {ds_type}", "    metrics:"]
    for label, key, value in results:
        lines += [f"    - name: {_yaml_str(label)}", f"      type: {_yaml_str(key)}", f"      value: {value:.2f}"]
    lines.append("---")
    head = eps_labels[-1]
    robustbench = {"name": name, "dataset": dataset, "threat_model": ev["threat_model"], "eps": head,
                   "n_examples": ev["n"], "clean_acc": round(ev["clean_acc"], 2),
                   "autoattack_acc": (ev.get("autoattack") or {}).get(head), "robust_acc": ev["worst"][head],
                   "protocol": ev["protocol"]}
    table = ["| attack | " + " | ".join(f"ε = {e}" for e in eps_labels) + " |", "|---" * (len(eps_labels) + 1) + "|"]
    for attack, by_eps in ev["attacks"].items():
        table.append(f"| {attack} | " + " | ".join("—" if e not in by_eps else f"{by_eps[e]:.1f}" for e in eps_labels) + " |")
    table.append("| **worst case** | " + " | ".join(f"**{ev['worst'][e]:.1f}**" for e in eps_labels) + " |")
    body = [f"# {name}", "", description, "", "## Recipe", "", "```json", json.dumps(recipe, indent=1), "```", "",
            "## Training cost", "",
            f"{training['wall_s'] / 60:.1f} minutes on {training['hardware']}, {training['threads']} thread(s).", "",
            "## Evaluation", "",
            f"Clean accuracy {ev['clean_acc']:.2f} % on {ev['clean_n']} test images. Robust accuracy (%) on the first "
            f"{ev['n']} test images, {ev['threat_model']}: {ev['protocol']}.", "", *table, "",
            "## RobustBench entry", "", "```json", json.dumps(robustbench, indent=1), "```", "",
            f"Reproduce: `surgery zoo train {name}`; load: `robust_surgery.load_model(\"zoo:{name}\")`.", ""]
    return "\n".join(lines + [""] + body)


def card_names() -> list[str]:
    """The zoo models that have a card."""
    folder = resources.files("robust_surgery.model_zoo").joinpath("cards")
    if not folder.is_dir():
        return []
    return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".md"))


def read_card(name: str) -> str:
    """The card of zoo model ``name`` (Markdown); a clear error naming the models that have one."""
    name = name.removeprefix("zoo:")
    if name not in card_names():
        raise InvalidInputError(f"no model card for {name!r}; cards exist for: {', '.join(card_names()) or 'none'}")
    return resources.files("robust_surgery.model_zoo").joinpath("cards", f"{name}.md").read_text(encoding="utf-8")
