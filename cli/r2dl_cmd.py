"""CLI command ``surgery reprogram r2dl``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import AMP, DATA_ROOT, DEVICE, TRUST_CODE, TRUST_PICKLE
from .render import check_out, console, err, guard, print_json

_R2DL = "Program (Θ) and mapping"


def register(reprogram_app: typer.Typer) -> None:
    """Add the ``r2dl`` subcommand to ``surgery reprogram``."""
    reprogram_app.command("r2dl")(guard(r2dl))


def r2dl(
    source: str = typer.Argument("zoo:minilm-sentiment", help="The frozen text classifier (its token embeddings are V_S)."),
    target: str = typer.Option("amp", "--target", help="Peptide task: amp, toxicity, toxicity-trembl, hemolysis, a folder with seqs.fasta + classes.txt, or a 'sequence<TAB>label' file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write Θ, k, mapping and the report to this .safetensors (load it with robust_surgery.reprogram.r2dl.load_r2dl)."),
    k: int = typer.Option(10, "--k", help="Non-zeros per row of Θ (source tokens per amino acid).", rich_help_panel=_R2DL),
    dense: bool = typer.Option(False, "--dense", help="Dense Θ: no OMP projection (the control).", rich_help_panel=_R2DL),
    omp_every: int = typer.Option(1, "--omp-every", help="Adam steps between OMP projections (1: after every step).", rich_help_panel=_R2DL),
    mapping: str = typer.Option("one-to-one", "--mapping", help="one-to-one (class j <- source class j), frequency or random.", rich_help_panel=_R2DL),
    init: str = typer.Option("letters", "--init", help="Θ's start: letters (each amino acid as its letter token) or random.", rich_help_panel=_R2DL),
    random_encoder: bool = typer.Option(False, "--random-encoder", help="Control: the source's encoder with random weights (same architecture).", rich_help_panel=_R2DL),
    epochs: int = typer.Option(1, "--epochs", help="Epochs."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam step size on Θ."),
    batch_size: int = typer.Option(32, "--batch-size", help="Sequences per step."),
    max_len: int = typer.Option(64, "--max-len", help="Cut sequences to their first N residues (CPU cost; peptides here are 5-255 long)."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Train on a stratified subsample of N training sequences."),
    n_test: Optional[int] = typer.Option(None, "--n-test", help="Evaluate on a stratified subsample of N test sequences."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of the task held out for testing (stratified, seeded)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also fit the classical baselines on the same split: composition (+ dipeptide) logistic regressions, and a random forest and gradient boosting on composition + dipeptides + physico-chemical descriptors (about a minute)."),
    seed: int = typer.Option(0, "--seed", help="Seed (split, shuffling, random parts)."),
    device: str = DEVICE,
    amp: str = AMP,
    data_root: Optional[Path] = DATA_ROOT,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """R2DL: reprogram a frozen text classifier for peptide sequences; only a k-sparse Θ over its token embeddings is learned.

    Example: [bold]surgery reprogram r2dl zoo:minilm-sentiment --target amp --k 10 --n-train 1024 --epochs 1 -o amp.r2dl.safetensors[/bold]
    """
    from robust_surgery.reprogram.r2dl import R2DLConfig, classical_baselines, run_r2dl, save_r2dl, split_task
    from robust_surgery.data.sequences import load_peptide_task

    cfg = R2DLConfig(k=k, dense=dense, omp_every=omp_every, epochs=epochs, batch_size=batch_size, lr=lr,
                     max_len=max_len, mapping=mapping, init=init, seed=seed, test_fraction=test_fraction,
                     n_train=n_train, n_test=n_test, random_encoder=random_encoder).check()
    check_out(out, ".safetensors", "output (-o)")
    from robust_surgery._device import resolve_amp, resolve_device

    resolve_device(device), resolve_amp(amp)  # bad words fail before anything loads
    root = str(data_root) if data_root else None
    task = load_peptide_task(target, root)
    result = run_r2dl(source, task, cfg, data_root=root, progress=True, trust_code=trust_code,
                      trust_pickle=trust_pickle, device=device, amp=amp)
    report = result.summary()
    report["baselines"] = []
    if baselines:
        train, test = split_task(task, cfg)
        report["baselines"] = classical_baselines(train, test, seed=seed)
    if out is not None:
        save_r2dl(result, out)
        report["output"] = str(out)
    if as_json:
        print_json(report)
        return
    _render(report, out)


def _render(report: dict, out: Optional[Path]) -> None:
    from rich.table import Table

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    t = Table(title=f"R2DL: {report['source']} → {report['task']['name']} "
                    f"(train {report['task']['n_train']}, test {report['task']['n_test']}, max_len {report['task']['max_len']})")
    for col, just in (("method", "left"), ("variant", "left"), ("accuracy", "right"), ("AUC", "right"), ("seconds", "right")):
        t.add_column(col, justify=just)
    t.add_row("R2DL", report["variant"], fmt(report["accuracy"]), fmt(report["auc"]), f"{report['seconds']:.0f}")
    for b in report["baselines"]:
        t.add_row(b["method"], "baseline (scikit-learn)", fmt(b["accuracy"]), fmt(b["auc"]), f"{b['seconds']:.1f}")
    console.print(t)
    err.print(f"training loss {report['first_loss']:.4f} (first 10 % of {report['steps']} steps) → "
              f"{report['last_loss']:.4f} (last 10 %)")
    if out is not None:
        console.print(f"saved [bold]{out}[/bold]")
