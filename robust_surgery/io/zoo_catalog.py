"""The zoo's catalog: what ``surgery zoo list`` shows, read from a JSON file without importing torch.

The registry (:mod:`robust_surgery.io.zoo`) builds the networks and so imports torch (about 2 s);
listing the zoo needs only each entry's description. ``catalog.json`` in the zoo package (``model_zoo/`` in the source tree) holds those
fields for every registered model; :func:`write_catalog` regenerates it from the registry
(``python -m robust_surgery.io.zoo_catalog``), and a test fails when the two disagree.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

__all__ = ["FIELDS", "catalog_path", "catalog", "entry_record", "write_catalog"]

FIELDS = ("name", "description", "dataset", "input_shape", "num_classes", "weights", "reference_acc", "source", "license")


def catalog_path() -> Path:
    """Where the catalog lives: ``catalog.json`` in the ``robust_surgery.model_zoo`` package folder
    (found without running the package, which would import torch)."""
    spec = importlib.util.find_spec("robust_surgery.model_zoo")
    return Path(list(spec.submodule_search_locations)[0]) / "catalog.json"


def entry_record(entry) -> dict:
    """The catalog record of a registry entry (:class:`robust_surgery.io.zoo.ZooEntry`)."""
    record = {key: getattr(entry, key) for key in FIELDS}
    record["input_shape"] = list(record["input_shape"])
    return record


def catalog() -> list[dict]:
    """Every zoo model's record, sorted by name, from the catalog file (or the registry when the
    file is missing, as in a checkout where it was never generated)."""
    try:
        return json.loads(catalog_path().read_text())
    except FileNotFoundError:
        from robust_surgery.io.zoo import list_models

        return [entry_record(e) for e in list_models()]


def write_catalog(path: Path | None = None) -> Path:
    """Regenerate the catalog file (default :func:`catalog_path`) from the registry, atomically."""
    from robust_surgery._files import atomic_path
    from robust_surgery.io.zoo import list_models

    path = path or catalog_path()
    text = json.dumps([entry_record(e) for e in list_models()], indent=1, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path


if __name__ == "__main__":
    print(write_catalog())
