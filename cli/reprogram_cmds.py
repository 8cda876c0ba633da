"""CLI commands for reprogramming: ``surgery reprogram ar|bar`` (and ``r2dl`` from r2dl_cmd)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import AMP, DATA_ROOT, DEVICE, TRUST_CODE, TRUST_PICKLE
from .render import check_out, console, err, fail, guard, print_json

reprogram_app = typer.Typer(help="Reprogram a frozen source model for a new task (AR, BAR, R2DL).", no_args_is_help=True)

SOURCE_HELP = "The frozen source: a spec (zoo:cifar-resnet20) or a model file, e.g. one written by surgery convert."
_IMAGE = "Program and mapping"
_EVAL = "Evaluation"

# options both commands take (Typer reads these defaults; one definition each)
TARGET = typer.Option("mnist", "--target", help="Target task: mnist or an image data path (ImageFolder, .pt).")
OUT = typer.Option(..., "--out", "-o", help="Output .safetensors (the whole pipeline; surgery evaluate accepts it).")
N_TRAIN = typer.Option(8000, "--n-train", help="Train on the first N target training points.")
N_TEST = typer.Option(1000, "--n-test", help="Report accuracy on the first N target test points.")
DECAY = typer.Option(0.96, "--decay", help="Learning-rate decay factor.")
DATA_SIZE = typer.Option(16, "--data-size", help="Side in pixels of the target input inside the canvas (resized).", rich_help_panel=_IMAGE)
CANVAS = typer.Option(None, "--canvas", help="Source input C,H,W (zoo sources know theirs).", rich_help_panel=_IMAGE)
M_LABELS = typer.Option(1, "--m", help="Source labels per target class.", rich_help_panel=_IMAGE)
COVER_DATA = typer.Option(False, "--cover-data", help="The program also adds a bounded pattern to the data region (a full-image visual prompt); default: the data is left untouched.", rich_help_panel=_IMAGE)
PGD_STEPS = typer.Option(20, "--steps", help="PGD steps.", rich_help_panel=_EVAL)
DATA_ROOT = DATA_ROOT
AS_JSON = typer.Option(False, "--json", help="Print the report as JSON on stdout.")


def register(app: typer.Typer) -> None:
    """Add ``surgery reprogram`` and its subcommands to the ``surgery`` app."""
    from . import r2dl_cmd

    r2dl_cmd.register(reprogram_app)
    app.add_typer(reprogram_app, name="reprogram")


def _ints(text: Optional[str], what: str) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        fail(f"{what} takes whole numbers separated by commas (3,32,32), got {text!r}", code=2)


def _data(source, target, n_train, n_test, data_root, out, trust_pickle, trust_code, device, amp):
    from robust_surgery._device import resolve_amp, resolve_device
    from robust_surgery.reprogram.pipeline import load_source, load_target

    check_out(out, ".safetensors", "output (-o)")
    resolve_device(device), resolve_amp(amp)  # bad words fail before anything loads
    root = str(data_root) if data_root else None
    with err.status(f"loading {source} and {target}"):
        src = load_source(source, data_root=root, trust_pickle=trust_pickle, trust_code=trust_code)
        train = load_target(target, "train", n=n_train, data_root=root)
        test = load_target(target, "test", n=n_test, data_root=root)
    return src, train, test


def _finish(model, report, test, attack, eps, steps, out, as_json, amp, extra_rows):
    from robust_surgery.evaluation.budgets import parse_eps
    from robust_surgery.reprogram.pipeline import save_reprogrammed, target_accuracy

    attacks = [a.strip().lower() for a in (attack or "").split(",") if a.strip()]
    eps_values = parse_eps(eps) if eps else ()
    if attacks and not eps_values:
        fail("--attack needs budgets: --eps 0.05,0.1", code=2)
    with err.status("evaluating on the target test set"):
        report["test"] = target_accuracy(model, *test, attacks=attacks, eps=eps_values, steps=steps, amp=amp)
    from robust_surgery._dist import is_main

    if not is_main():  # under torchrun rank 0 writes the file and reports
        return
    manifest = save_reprogrammed(model, out, reprogram=report)
    if as_json:
        print_json({"output": str(out), "report": report, "arch_kwargs": manifest["arch_kwargs"]})
        return
    from rich.table import Table

    t = Table(title=f"{report['method'].upper()} reprogramming of {report['source']} → {report['target']}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("training points", str(report["n_train"]))
    for name, value in extra_rows(report):
        t.add_row(name, value)
    t.add_row("clean accuracy (test)", f"{report['test']['clean_acc']:.1f} % (n = {report['test']['n_examples']})")
    for a, by_eps in report["test"]["robust_acc"].items():
        for e, acc in by_eps.items():
            t.add_row(f"{a} ε = {e}", f"{acc:.1f} %")
    if len(report["test"]["robust_acc"]) > 1:
        for e, acc in report["test"].get("worst_acc", {}).items():
            t.add_row(f"[bold]worst[/bold] ε = {e} (per point)", f"[bold]{acc:.1f} %[/bold]")
    t.add_row("training time", f"{report['seconds']:.0f} s")
    console.print(t)
    console.print(f"saved [bold]{out}[/bold] (surgery evaluate {out} --data {report['target']} attacks the whole pipeline)")


@reprogram_app.command("ar")
@guard
def ar(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    target: str = TARGET,
    out: Path = OUT,
    n_train: Optional[int] = N_TRAIN,
    n_test: Optional[int] = N_TEST,
    epochs: int = typer.Option(2, "--epochs", help="Epochs."),
    lr: float = typer.Option(0.05, "--lr", help="Adam learning rate (× --decay every --decay-every epochs)."),
    decay: float = DECAY,
    decay_every: int = typer.Option(2, "--decay-every", help="Epochs between decays."),
    reg: float = typer.Option(1e-6, "--reg", help="λ of the λ‖W‖² penalty."),
    adv_eps: float = typer.Option(0.0, "--adv-eps", help="Train the program adversarially: PGD at this L∞ budget on the [0, 1] target input (0: clean)."),
    adv_steps: int = typer.Option(7, "--adv-steps", help="PGD steps of --adv-eps training."),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch size."),
    seed: int = typer.Option(0, "--seed", help="Seed (shuffling, random mapping)."),
    data_size: int = DATA_SIZE,
    canvas: Optional[str] = CANVAS,
    low_dim: Optional[int] = typer.Option(None, "--low-dim", help="Coarse program side r (W is C×r×r, upsampled).", rich_help_panel=_IMAGE),
    mapping: str = typer.Option("one-to-one", "--mapping", help="one-to-one, random, frequency, ilm (iterative: frequency re-solved every epoch) or linear (a learned output layer on the source log-probabilities, trained with W).", rich_help_panel=_IMAGE),
    mapping_lr: float = typer.Option(0.01, "--mapping-lr", help="Adam learning rate of the linear mapping (decayed with --lr).", rich_help_panel=_IMAGE),
    m: int = M_LABELS,
    cover_data: bool = COVER_DATA,
    attack: Optional[str] = typer.Option(None, "--attack", help="Also attack the pipeline on the test points: fgsm,pgd,...", rich_help_panel=_EVAL),
    eps: Optional[str] = typer.Option(None, "--eps", help="Budgets for --attack (L∞ on the [0, 1] target inputs): 0.05,0.1.", rich_help_panel=_EVAL),
    steps: int = PGD_STEPS,
    device: str = DEVICE,
    amp: str = AMP,
    data_root: Optional[Path] = DATA_ROOT,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = AS_JSON,
):
    """AR: white-box adversarial reprogramming; trains only the program W with the source's gradients.

    Example: [bold]surgery reprogram ar zoo:cifar-resnet20 --target mnist --n-train 8000 --epochs 2 --attack pgd --eps 0.1 -o ar.safetensors[/bold]
    """
    from robust_surgery.reprogram.ar import ARConfig, reprogram_ar

    cfg = ARConfig(epochs=epochs, lr=lr, reg=reg, batch_size=batch_size, decay=decay, decay_every=decay_every, seed=seed,
                   adv_eps=adv_eps, adv_steps=adv_steps, mapping_lr=mapping_lr)
    src, (x, y), test = _data(source, target, n_train, n_test, data_root, out, trust_pickle, trust_code,
                                   device, amp)
    model, report = reprogram_ar(src, x, y, cfg, canvas=_ints(canvas, "--canvas"), data_size=data_size,
                                 low_dim=low_dim, mapping=mapping, m=m, cover_data=cover_data, progress=True,
                                 device=device, amp=amp)
    report.update(source=source, target=target)
    last = report["history"][-1]
    _finish(model, report, test, attack, eps, steps, out, as_json, amp, lambda r: [
        ("program entries d", str(r["d"])), ("final training loss", f"{last['loss']:.4f}"),
        ("training accuracy (last epoch)", f"{last['train_acc']:.1f} %")])


@reprogram_app.command("bar")
@guard
def bar(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    target: str = TARGET,
    out: Path = OUT,
    n_train: Optional[int] = N_TRAIN,
    n_test: Optional[int] = N_TEST,
    steps_train: int = typer.Option(200, "--train-steps", help="Zeroth-order steps."),
    q: int = typer.Option(20, "--q", help="Random directions per gradient estimate."),
    beta: float = typer.Option(0.05, "--beta", help="Smoothing radius β of the estimate."),
    lr: float = typer.Option(0.05, "--lr", help="Adam learning rate on the estimate (× --decay every --decay-every steps)."),
    decay: float = DECAY,
    decay_every: int = typer.Option(50, "--decay-every", help="Steps between decays."),
    batch_size: int = typer.Option(32, "--batch-size", help="Target points per step (a step costs batch × (q + 1) queries)."),
    gamma: float = typer.Option(2.0, "--gamma", help="Focal loss γ (0 with --no-class-balance: cross-entropy)."),
    class_balance: bool = typer.Option(True, "--class-balance/--no-class-balance", help="Class-balance weights ω_j ∝ 1/n_j."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Most queries to spend (mapping included)."),
    price: float = typer.Option(1.0, "--price", help="Price of 1000 queries, for the cost report."),
    seed: int = typer.Option(0, "--seed", help="Seed (batches, directions, random mapping)."),
    data_size: int = DATA_SIZE,
    canvas: Optional[str] = CANVAS,
    low_dim: Optional[int] = typer.Option(8, "--low-dim", help="Coarse program side r (W is C×r×r, upsampled); 0 for a full-size W.", rich_help_panel=_IMAGE),
    mapping: str = typer.Option("frequency", "--mapping", help="frequency, ilm (iterative: re-solved every pass over the data, len(data) queries each), random or one-to-one.", rich_help_panel=_IMAGE),
    m: int = M_LABELS,
    cover_data: bool = COVER_DATA,
    attack: Optional[str] = typer.Option(None, "--attack", help="Also attack the pipeline on the test points (white-box, for the robustness study): fgsm,pgd,...", rich_help_panel=_EVAL),
    eps: Optional[str] = typer.Option(None, "--eps", help="Budgets for --attack: 0.05,0.1.", rich_help_panel=_EVAL),
    steps: int = PGD_STEPS,
    device: str = DEVICE,
    amp: str = AMP,
    data_root: Optional[Path] = DATA_ROOT,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = AS_JSON,
):
    """BAR: black-box reprogramming; the source is only queried for probabilities, gradients are estimated.

    Example: [bold]surgery reprogram bar zoo:cifar-resnet20 --target mnist --train-steps 300 --q 20 --low-dim 8 --budget 500000 --price 1.0 -o bar.safetensors[/bold]
    """
    from robust_surgery.reprogram.bar import BARConfig, reprogram_bar

    cfg = BARConfig(steps=steps_train, q=q, beta=beta, lr=lr, batch_size=batch_size, gamma=gamma,
                    class_balance=class_balance, decay=decay, decay_every=decay_every, seed=seed, budget=budget,
                    price_per_1000=price)
    src, (x, y), test = _data(source, target, n_train, n_test, data_root, out, trust_pickle, trust_code,
                                   device, amp)
    model, report = reprogram_bar(src, x, y, cfg, canvas=_ints(canvas, "--canvas"), data_size=data_size,
                                  low_dim=low_dim or None, mapping=mapping, m=m, cover_data=cover_data, progress=True,
                                  device=device, amp=amp)
    report.update(source=source, target=target)
    _finish(model, report, test, attack, eps, steps, out, as_json, amp, lambda r: [
        ("program entries d", str(r["d"])), ("steps", str(r["steps"])),
        ("queries (mapping + training)", f"{r['queries']:,} ({r['mapping_queries']:,} + {r['queries'] - r['mapping_queries']:,})"),
        (f"cost at {r['price_per_1000']:g} per 1000 queries", f"{r['cost']:.2f}")])
