"""Our training recipe for the MNIST zoo models, and safe checkpoint writing.

``train_zoo_model("mnist-mlp-rs")`` retrains a zoo architecture from scratch on the MNIST train
split (seeded; deterministic on CPU for a fixed thread count) and evaluates it on the test split.
The embedded checkpoints in ``checkpoints/`` were made with::

    python -m robust_surgery.model_zoo.train mnist-mlp-rs --out model_zoo/checkpoints/mnist-mlp-rs.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery._device import amp_name, autocast, resolve_device
from robust_surgery.data.datasets import load_mnist
from robust_surgery._loops import evaluate_accuracy
from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop
from robust_surgery.io.zoo import ZooError, get_entry

from .hardened import HARDENED, harden
from .text_sentiment import train_sentiment_head
from robust_surgery.errors import InvalidInputError

__all__ = ["HEAD_FITS", "RECIPES", "evaluate_accuracy", "save_state_dict_safetensors", "train_zoo_model", "trainable"]

# Default recipe per model: Adam, plain cross-entropy, shuffled mini-batches, no augmentation.
RECIPES: dict[str, dict] = {
    "mnist-mlp-rs": {"epochs": 2, "lr": 1e-3, "batch_size": 128, "optimizer": "adam"},
    "mnist-lenet-rs": {"epochs": 3, "lr": 1e-3, "batch_size": 64, "optimizer": "adam"},
    "mnist-cnn": {"epochs": 3, "lr": 1e-3, "batch_size": 128, "optimizer": "adam"},  # TRADES's SmallCNN
}
RECIPES["mnist-mlp"] = dict(RECIPES["mnist-mlp-rs"])
RECIPES["mnist-lenet"] = dict(RECIPES["mnist-lenet-rs"])


# Zoo models whose only trained part is a head fitted in closed form on a frozen pretrained encoder
# (no epochs, learning rate or batches): name -> fit(data_root, seed) -> (model, metrics).
HEAD_FITS: dict[str, Callable] = {"minilm-sentiment": train_sentiment_head}


def trainable() -> list[str]:
    """Names :func:`train_zoo_model` can train."""
    return sorted([*RECIPES, *HEAD_FITS, *HARDENED])


def _fit_head(name: str, *, epochs, lr, batch_size, n_train, seed: int, data_root, device, amp
              ) -> tuple[nn.Module, dict]:
    """Fit the head of a HEAD_FITS model; the gradient-training options do not apply and are refused."""
    given = [flag for flag, val in (("--epochs", epochs), ("--lr", lr), ("--batch-size", batch_size),
                                    ("--n-train", n_train), ("--amp", amp_name(amp)),
                                    ("--device", None if str(device or "auto") == "auto" else device)) if val is not None]
    if given:
        raise InvalidInputError(f"{name}'s head is fitted by cross-validated logistic regression on frozen embeddings: "
                         f"{', '.join(given)} do not apply; drop them (only --seed and --data-root do)")
    model, metrics = HEAD_FITS[name](data_root, seed)
    return model, {**metrics, "test_n": metrics["n_test"], "torch": torch.__version__,
                   "threads": torch.get_num_threads()}


def _harden(name: str, *, epochs, lr, batch_size, seed: int, data_root, n_train, progress: bool, device, amp):
    """Run the hardening recipe of ``name`` (options given override the recipe's)."""
    import dataclasses

    from robust_surgery.limits import check_count, check_positive_finite

    changes = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)) if v is not None}
    recipe = dataclasses.replace(HARDENED[name], seed=seed, **changes)
    check_count("epochs", recipe.epochs, "epochs", flag="--epochs")
    check_count("batch_size", recipe.batch_size, "batch_size", flag="--batch-size")
    check_positive_finite("lr", recipe.lr, flag="--lr")
    if n_train is not None:
        check_count("n_train", n_train, "points", flag="--n-train")
    model, metrics = harden(recipe, data_root=data_root, n_train=n_train, progress=progress, device=device, amp=amp)
    # saved files name the base architecture: rs.load rebuilds the NRPM layers from the manifest
    return model, {**metrics, "name": name, "arch": f"zoo:{recipe.base}", "torch": torch.__version__,
                   "threads": torch.get_num_threads()}


def save_state_dict_safetensors(model: nn.Module, path: str | os.PathLike,
                                metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` (CPU, contiguous) to ``path`` atomically (temp file + rename)."""
    from safetensors.torch import save_file

    from robust_surgery._files import atomic_path

    path = Path(path)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path, make_parents=True) as tmp:
        save_file(sd, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def train_zoo_model(name: str, *, epochs: int | None = None, lr: float | None = None,
                    batch_size: int | None = None, seed: int = 0, data_root: str | os.PathLike | None = None,
                    device: str | torch.device | None = "auto", progress: bool = True,
                    n_train: int | None = None, amp: str | torch.dtype | None = None) -> tuple[nn.Module, dict]:
    """Train zoo architecture ``name`` from scratch on MNIST train (60000 images, [0,1] pixels).

    Unset ``epochs``/``lr``/``batch_size`` take :data:`RECIPES` [name]. :data:`HARDENED` models
    (``mnist-lenet-p3``, ``cifar-resnet20-at``, ...) run their hardening recipe from the pretrained
    base instead (:func:`robust_surgery.model_zoo.hardened.harden`). :data:`HEAD_FITS` models
    (``minilm-sentiment``) refit their head on the frozen encoder instead (their own data;
    ``seed`` and ``data_root`` only). Returns (model in eval
    mode, metrics) with per-epoch mean train loss, test accuracy in percent on the 10000 test
    images, test_correct, seconds and the recipe. Progress goes to stderr. ``n_train``: train on
    the first n training images only (quick checks). ``device``: ``auto`` (CUDA when there is one),
    ``cpu`` or ``cuda[:N]``; ``amp``: ``bf16``/``fp16`` trains and evaluates under autocast.
    """
    amp_name(amp), resolve_device(device)  # bad words fail before anything loads
    if name in HARDENED:
        return _harden(name, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, data_root=data_root,
                       n_train=n_train, progress=progress, device=device, amp=amp)
    entry = get_entry(name)
    if name in HEAD_FITS:
        return _fit_head(name, epochs=epochs, lr=lr, batch_size=batch_size, n_train=n_train, seed=seed,
                         data_root=data_root, device=device, amp=amp)
    if name not in RECIPES:
        raise ZooError(
            f"No training recipe for '{name}' (dataset {entry.dataset}); trainable: {', '.join(trainable())}"
        )
    recipe = dict(RECIPES[name])
    for key, val in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size)):
        if val is not None:
            recipe[key] = val
    from robust_surgery.limits import check_count, check_positive_finite, check_seed

    check_count("epochs", recipe["epochs"], "epochs", flag="--epochs")
    check_count("batch_size", recipe["batch_size"], "batch_size", flag="--batch-size")
    check_positive_finite("lr", recipe["lr"], flag="--lr")
    check_seed(seed)
    if n_train is not None:
        check_count("n_train", n_train, "points", flag="--n-train")
    device = resolve_device(device)

    x_train, y_train = load_mnist("train", data_root)
    if n_train is not None:
        x_train, y_train = x_train[:n_train], y_train[:n_train]
    x_test, y_test = load_mnist("test", data_root)
    torch.manual_seed(seed)
    model = entry.builder().to(device)
    opt = make_optimizer(model.parameters(), "adam", recipe["lr"])
    gen = torch.Generator().manual_seed(seed)  # one generator across epochs (the shipped weights' order)
    t0 = time.time()

    def step(xb, yb, epoch, s):
        model.train()
        with autocast(device, amp):
            logits = model(xb).float()
        return BatchLoss(F.cross_entropy(logits, yb))

    history = train_loop(model, opt, x_train, y_train, step, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
                         order=lambda epoch: torch.randperm(len(x_train), generator=gen), device=device,
                         progress=progress, label=f"{name} epoch").history
    losses = [row["train_loss"] for row in history]
    model.eval()
    correct, count = evaluate_accuracy(model, x_test, y_test, device=device, amp=amp)
    metrics = {
        "name": name, "seed": seed, "device": str(device), "amp": amp_name(amp), **recipe, "n_train": len(x_train),
        "train_loss": losses, "test_correct": correct, "test_n": count,
        "test_acc": 100.0 * correct / count, "seconds": time.time() - t0,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    return model, metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m robust_surgery.model_zoo.train NAME --out FILE``: train and save a checkpoint."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root")
    args = ap.parse_args(argv)
    if args.name in HEAD_FITS:  # the shipped file holds the head alone: its own script writes it
        raise SystemExit(f"{args.name}: run python -m {HEAD_FITS[args.name].__module__} --out FILE "
                         "(writes the head alone)")
    model, metrics = train_zoo_model(args.name, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                     seed=args.seed, data_root=args.data_root, device="cpu")
    timings = ("train_loss", "seconds", "history", "train_cpu_s", "train_wall_s")
    meta = {k: v for k, v in metrics.items() if k not in timings}  # reproducible bytes
    if "train_loss" in metrics:
        meta["train_loss"] = ",".join(f"{v:.5f}" for v in metrics["train_loss"])
    path = save_state_dict_safetensors(model, args.out, metadata=meta)
    from robust_surgery.io.zoo import sha256_file

    print(f"{path}: test_acc {metrics['test_acc']:.2f} ({metrics['test_correct']}/{metrics['test_n']}), "
          f"sha256 {sha256_file(path)}, {metrics['seconds']:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
