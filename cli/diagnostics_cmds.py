"""CLI commands for purification diagnostics: ``surgery purification``, ``pretrain``, ``inherit``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import AMP, ARCH_KWARGS, DATA_ROOT, DEVICE, TRUST_CODE, TRUST_PICKLE, parse_arch_kwargs
from .render import check_out, console, err, fail, guard, print_json

DATA_HELP = "mnist, cifar10, a path, or synthetic[:d=64,k=3,seed=0,...] (the sparse-coding task)."
MODEL_HELP = "A model file (.safetensors, .pt, .pth) or a spec: zoo:NAME, torchvision:NAME, timm:NAME."


def _load(model: str, arch, data_root, trust_pickle: bool = False, trust_code: bool = False, arch_kwargs=None):
    import robust_surgery as rs

    with err.status(f"loading {model}"):
        return rs.load_model(model, arch=arch, data_root=str(data_root) if data_root else None,
                             trust_pickle=trust_pickle, trust_code=trust_code,
                             arch_kwargs=parse_arch_kwargs(arch_kwargs))


def _input_eps(data: str, eps: list[float]) -> list[float]:
    """Budgets on the synthetic task are given in feature units (the theory's); models take pixels."""
    from robust_surgery.purification.synthetic import parse_synthetic_spec

    task = parse_synthetic_spec(data)
    return [task.pixel_eps(e) for e in eps] if task is not None else eps


def _floats(text: str, what: str) -> list[float]:
    from robust_surgery.evaluation.budgets import parse_eps

    try:
        return list(parse_eps(text))
    except ValueError as e:
        fail(f"{what}: {e}", code=2)


def purification(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    layer: str = typer.Option(..., "--layer", help="The Linear/Conv layer to score (conv1, fc1, layer1.0.conv1 ...)."),
    basis: str = typer.Option("ica", "--basis", help="ica, dict, random, true (synthetic data) or a file (.pt/.npy/.txt, D x n atoms as columns)."),
    n: int = typer.Option(2000, "--n", help="Inputs (first N of the split) to learn the basis and the diagnostics from."),
    n_patches: int = typer.Option(20000, "--n-patches", help="Patches for ICA / dictionary learning."),
    atoms: Optional[int] = typer.Option(None, "--atoms", help="Atoms of a learned basis (default: the layer's fan-in)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the learned and random bases."),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second checkpoint of the same architecture (MODEL clean, this adversarial): β/v decomposition."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write per-unit PR histograms (model vs control, and --compare) as PNG."),
    filters: Optional[Path] = typer.Option(None, "--filters", help="Write the layer's kernels as an image grid (PNG)."),
    per_unit: bool = typer.Option(False, "--per-unit", help="With --json: every unit's scores too."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a weights-only file."),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    data_root: Optional[Path] = DATA_ROOT,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """Per-unit purity of one layer in a feature basis beside a random control, with kurtosis and activation rate.

    Example: [bold]surgery purification zoo:mnist-lenet --data mnist --layer conv1 --basis ica --json[/bold]
    Synthetic: [bold]surgery purification adv.safetensors --data synthetic --layer fc1 --basis true --compare clean.safetensors[/bold]
    """
    from robust_surgery.purification.diagnostics import plot_filters, plot_purity_histograms, purification_report

    check_out(plot, ".png", "plot (--plot)")
    check_out(filters, ".png", "filter image (--filters)")
    net = _load(model, arch, data_root, trust_pickle, trust_code, arch_kwargs)
    other = _load(compare, arch, data_root, trust_pickle, trust_code, arch_kwargs) if compare else None
    with err.status("learning the basis and scoring the units"):
        report = purification_report(net, data, layer, basis=basis, n=n, n_patches=n_patches, n_atoms=atoms, seed=seed,
                                     compare=other, model_name=model, compare_name=compare,
                                     data_root=str(data_root) if data_root else None)
        if plot is not None:
            groups = {Path(model).stem if not model.startswith(("zoo:", "torchvision:", "timm:")) else model: report}
            if other is not None:
                chosen = report.bases[0]
                second = purification_report(other, data, layer, basis=chosen, n=n, n_patches=n_patches, seed=seed,
                                             model_name=compare, data_root=str(data_root) if data_root else None)
                groups[compare] = second
            plot_purity_histograms(groups, plot, title=f"{layer}: per-unit participation ratio")
        if filters is not None:
            layers = {model: report.filters}
            if other is not None:
                layers[compare] = other.get_submodule(layer).weight
            plot_filters(layers, filters)
    if as_json:
        print_json(report.to_dict(per_unit=per_unit))
    else:
        console.print(report)
        for path in (plot, filters):
            if path is not None:
                err.print(f"wrote {path}")


def pretrain(
    model: str = typer.Argument(..., help=MODEL_HELP + " 'mlp': the synthetic task's 64 -> hidden -> 1 network."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors."),
    scratch: bool = typer.Option(False, "--scratch", help="Re-initialise the model's weights first (train from scratch)."),
    adversarial: str = typer.Option("none", "--adversarial", help="none, fgsm, pgd or noise (random noise of norm ε: the control)."),
    eps: str = typer.Option("0", "--eps", help="Budget in input units ([0, 1] pixels; fractions like 8/255 allowed); on synthetic data in feature units."),
    threat: str = typer.Option("Linf", "--threat", help="Linf or L2."),
    pgd_steps: int = typer.Option(5, "--pgd-steps", help="PGD steps (step 2.5·ε/steps, random start)."),
    ramp: float = typer.Option(0.0, "--ramp", help="Fraction of training over which ε grows linearly from 0."),
    epochs: int = typer.Option(1, "--epochs", help="Epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate."),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam or sgd (momentum 0.9)."),
    schedule: str = typer.Option("constant", "--schedule", help="constant, cosine or step."),
    batch_size: int = typer.Option(128, "--batch-size", help="Batch size."),
    seed: int = typer.Option(0, "--seed", help="Seed (initialisation with --scratch, shuffling, attacks)."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Train on the first N training points."),
    val_n: int = typer.Option(0, "--val-n", help="Held-out points (end of the training split) for a validation accuracy."),
    hidden: int = typer.Option(256, "--hidden", help="Hidden units of the 'mlp' model."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a weights-only file."),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    data_root: Optional[Path] = DATA_ROOT,
    device: str = DEVICE,
    amp: str = AMP,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print the epoch history as JSON on stdout."),
):
    """Train a plain model clean, adversarially (FGSM/PGD, L∞ or L2, ε ramp) or with random noise, and save it.

    Example: [bold]surgery pretrain zoo:mnist-lenet --scratch --data mnist --adversarial pgd --eps 0.3 --epochs 1 --n-train 10000 -o lenet-adv.safetensors[/bold]
    Synthetic: [bold]surgery pretrain mlp --data synthetic --adversarial pgd --threat L2 --eps 0.25 --ramp 0.33 --epochs 40 -o adv.safetensors[/bold]
    """
    import robust_surgery as rs
    from robust_surgery.purification.inherit import random_encoder
    from robust_surgery._device import resolve_device
    from robust_surgery.training.pretrain import pretrain as run_pretrain
    from robust_surgery.purification.synthetic import parse_synthetic_spec

    out = check_out(out, ".safetensors", "output (-o)")
    task = parse_synthetic_spec(data)
    if model == "mlp":
        if task is None:
            fail("the 'mlp' model is the synthetic task's network: use --data synthetic[:...], or give a model spec", code=2)
        import torch

        torch.manual_seed(seed)
        net = rs.build_arch("robust_surgery.purification.synthetic:sparse_coding_mlp",
                            kwargs={"d": task.d, "hidden": hidden, "span": task.span})
    else:
        net = _load(model, arch, data_root, trust_pickle, trust_code, arch_kwargs)
        if scratch:
            net = random_encoder(net, seed)
    values = _floats(eps, "--eps")
    if len(values) != 1:
        fail(f"--eps takes one budget for training, got {eps!r}", code=2)
    train_eps = _input_eps(data, values)[0]
    net, history = run_pretrain(net, task or data, adversarial=adversarial, eps=train_eps, threat=threat,
                                pgd_steps=pgd_steps, ramp=ramp, epochs=epochs, lr=lr, optimizer=optimizer,
                                schedule=schedule, batch_size=batch_size, seed=seed, val_n=val_n, n_train=n_train,
                                data_root=str(data_root) if data_root else None, progress=True,
                                device=resolve_device(device), amp=amp)
    from robust_surgery._dist import is_main

    if not is_main():  # under torchrun rank 0 writes the file and reports
        return
    rs.save(net, out)
    if as_json:
        print_json({"output": str(out), "history": history})
        return
    last = history[-1]
    val = f", validation accuracy {last['val_clean_acc']:.1f} %" if "val_clean_acc" in last else ""
    console.print(f"saved [bold]{out}[/bold]: {epochs} epoch(s), {adversarial} training, final loss "
                  f"{last['train_loss']:.4f}{val}")


def inherit(
    models: list[str] = typer.Argument(..., help="Encoders: model files or specs, optionally NAME=MODEL; 'random' adds a re-initialised copy of the first, 'nrpm' an NRPM conversion of it."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    layer: str = typer.Option(..., "--layer", help="Module whose output is the frozen feature (relu, relu3, layer3 ...)."),
    downstream: Optional[str] = typer.Option(None, "--downstream", help="Real data: parity, half, vehicles, map:a,b,... ; synthetic: the seed of another label vector (default 1)."),
    eps: str = typer.Option("0.1", "--eps", help="PGD budgets, comma-separated (synthetic: feature units)."),
    threat: str = typer.Option("Linf", "--threat", help="Linf or L2."),
    n_train: int = typer.Option(5000, "--n-train", help="Training points for the linear head."),
    n: int = typer.Option(500, "--n", help="Test points."),
    steps: int = typer.Option(20, "--steps", help="PGD steps."),
    epochs: int = typer.Option(50, "--epochs", help="Epochs of the linear head."),
    lam: float = typer.Option(0.5, "--lam", help="λ of the 'nrpm' encoder (paradigm 1, L1, K = 3)."),
    seed: int = typer.Option(0, "--seed", help="Seed."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of weights-only files."),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    data_root: Optional[Path] = DATA_ROOT,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON on stdout."),
):
    """Freeze encoders, train a clean linear head on a downstream task, compare clean and PGD accuracy.

    Example: [bold]surgery inherit clean=zoo:mnist-lenet adv=lenet-adv.safetensors nrpm random --data mnist --layer relu3 --downstream parity --eps 0.1,0.2[/bold]
    """
    import robust_surgery as rs
    from robust_surgery.purification.inherit import compare_encoders, random_encoder

    encoders = {}
    for item in models:
        name, eq, source = item.partition("=")
        source = source if eq else item
        if source in ("random", "nrpm"):
            if not encoders:
                fail(f"'{source}' is derived from the first encoder: give a model before it", code=2)
            first = next(iter(encoders.values()))
            encoders[name] = random_encoder(first, seed) if source == "random" else \
                rs.convert(first, paradigm=1, lam=lam, inplace=False)
        else:
            encoders[name] = _load(source, arch, data_root, trust_pickle, trust_code, arch_kwargs)
    report = compare_encoders(encoders, data, layer, downstream=downstream, eps=_input_eps(data, _floats(eps, "--eps")),
                              threat=threat, n_train=n_train, n_test=n, steps=steps, epochs=epochs, seed=seed,
                              data_root=str(data_root) if data_root else None)
    if as_json:
        print_json(report.to_dict())
    else:
        console.print(report)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``surgery`` app."""
    app.command("purification")(guard(purification))
    app.command("pretrain")(guard(pretrain))
    app.command("inherit")(guard(inherit))
