"""The ``surgery`` command line: parse, call the library, render. No logic of its own."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .options import (ADV_WEIGHT, ADVERSARIAL, AMP, ARCH_KWARGS, BATCH_SIZE, CHECKPOINT_DIR, DATA_ROOT, DEVICE, EPOCHS,
                      KEEP, LOG, LR, N_TRAIN, OPTIMIZER, SCHEDULE, SEED, TRUST_CODE, TRUST_PICKLE, VAL_N,
                      parse_arch_kwargs)
from .render import (SurgeryGroup, check_out, console, err, fail, guard, print_json,
                     write_json)

app = typer.Typer(
    cls=SurgeryGroup,
    name="surgery",
    help="Model surgery for robustness: convert pretrained PyTorch networks to NRPM layers, fine-tune, evaluate and save them.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
zoo_app = typer.Typer(help="The model zoo: reference architectures and checkpoints.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

MODEL_HELP = ("A model file (.safetensors, .pt, .pth) or a spec: zoo:NAME, torchvision:NAME, timm:NAME.")
ARCH_HELP = ("Architecture of a weights-only file: zoo:NAME, torchvision:NAME, timm:NAME or "
             "package.module:Callable.")


def _input_shape(text: Optional[str], model) -> Optional[tuple[int, ...]]:
    if text:
        try:
            return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
        except ValueError:
            fail(f"--input-shape must be numbers like 3,32,32 (channels first, no batch), got {text!r}")
    from robust_surgery.io.zoo import get_entry, zoo_name

    name = zoo_name(model)
    return tuple(get_entry(name).input_shape) if name else None


def _default_out(model_arg: str) -> Path:
    stem = model_arg.split(":", 1)[1] if ":" in model_arg and not Path(model_arg).exists() else Path(model_arg).stem
    return Path(f"{stem.replace('/', '_')}.nrpm.safetensors")


@app.command()
@guard
def convert(
    model: str = typer.Argument(..., help=MODEL_HELP),
    paradigm: int = typer.Option(1, "--paradigm", "-p", help="1: no fine-tuning; 2: fine-tune λ only; 3: fine-tune everything."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    norm: Optional[str] = typer.Option(None, "--norm", help="Reweighting: L2, L1, MCP, Huber, HM (default: the zoo model's preset, else L1)."),
    K: Optional[int] = typer.Option(None, "--K", "-K", help="IRLS steps (default: the zoo model's preset, else 3)."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Paradigm 1: ε in the reweighting (default 1e-3). Paradigms 2-3: the adversarial training budget (as --train-eps)."),
    nrpm_eps: Optional[float] = typer.Option(None, "--nrpm-eps", help="ε in the reweighting, in any paradigm (default: the zoo model's preset, else 1e-3)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="λ: 1 = original layer, 0 = pure NRPM (default: the zoo model's preset, else 0.5)."),
    gamma: float = typer.Option(4.0, "--gamma", help="γ of MCP/HM."),
    delta: float = typer.Option(3.0, "--delta", help="δ of Huber/HM."),
    include: Optional[str] = typer.Option(None, "--include", help="Layers to convert: comma-separated names, globs ('layer1.*') or 're:<regex>'."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Layers to leave alone (same syntax)."),
    override: Optional[str] = typer.Option(None, "--override", help='Per-layer settings as JSON: \'{"fc3": {"lam": 1.0}, "re:conv.*": {"K": 1}}\'.'),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .safetensors (default: NAME.nrpm.safetensors)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="C,H,W of one input, for the cost estimate (zoo models know theirs)."),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    non_strict: bool = typer.Option(False, "--non-strict", help="Load weights that match the architecture and ignore the rest."),
    data_root: Optional[Path] = DATA_ROOT,
    device: str = DEVICE,
    amp: str = AMP,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    recalibrate_bn: int = typer.Option(0, "--recalibrate-bn", help="After converting, re-estimate every BatchNorm's running statistics on N clean training batches of --data (no training step; recorded in the manifest)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data (mnist, cifar10 or a path): for --recalibrate-bn and paradigms 2-3.", rich_help_panel="Fine-tuning (paradigms 2 and 3)"),
    adversarial: str = ADVERSARIAL,
    train_eps: Optional[float] = typer.Option(None, "--train-eps", help="Adversarial budget while training (default 0.2; --eps means this in paradigms 2-3).", rich_help_panel="Fine-tuning (paradigms 2 and 3)"),
    epochs: int = EPOCHS,
    lr: float = LR,
    optimizer: str = OPTIMIZER,
    schedule: str = SCHEDULE,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    n_train: Optional[int] = N_TRAIN,
    val_n: int = VAL_N,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR,
    log: Optional[Path] = LOG,
    keep: str = KEEP,
    adv_weight: float = ADV_WEIGHT,
):
    """Replace a model's Linear/Conv layers by NRPM layers (and, for paradigms 2-3, fine-tune), then save it.

    Example: [bold]surgery convert zoo:mnist-mlp --paradigm 1 --lam 0.6 --K 1 --eps 5e-5 -o mlp.safetensors[/bold]
    Paradigm 2: [bold]surgery convert zoo:mnist-mlp --paradigm 2 --data mnist --adversarial fgsm --train-eps 0.2 --epochs 1 -o p2.safetensors[/bold]
    """
    import robust_surgery as rs
    from robust_surgery.surgery import presets

    out = check_out(out or _default_out(model), ".safetensors", "output (-o)")
    if recalibrate_bn < 0:
        fail(f"--recalibrate-bn takes a number of batches >= 1 (0: off), got {recalibrate_bn}", code=2)
    if recalibrate_bn and not data:
        fail("--recalibrate-bn N runs N clean training batches: give them with --data (mnist, cifar10 or a path)", code=2)
    if paradigm in (2, 3) and not data:
        fail(f"paradigm {paradigm} ({rs.PARADIGMS[paradigm]}) fine-tunes: give the training data with --data "
             "(mnist, cifar10 or a path), or convert with --paradigm 1", code=2)
    try:  # --eps: the reweighting ε in paradigm 1, the training budget in paradigms 2-3
        nrpm_eps, train_eps = presets.paradigm_eps(paradigm, eps, nrpm_eps, train_eps)
    except rs.errors.InvalidInputError as e:
        fail(str(e), code=2)
    overrides = None
    if override:
        try:
            overrides = json.loads(override)
        except json.JSONDecodeError as e:
            fail(f"--override must be JSON mapping layer names/patterns to settings: {e}", code=2)
    if paradigm in (2, 3):  # every training setting is checked before anything is loaded or trained
        _check_finetune_args(paradigm, adversarial, train_eps, epochs, lr, optimizer, schedule, batch_size, seed,
                             n_train, val_n, checkpoint_dir, log, keep, adv_weight, device, amp)
    with err.status(f"loading {model}"):
        net = rs.load_model(model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                            trust_pickle=trust_pickle, trust_code=trust_code, strict=not non_strict,
                            data_root=str(data_root) if data_root else None)
    shape = _input_shape(input_shape, net)
    if shape:
        rs.inspect_model(net, shape)  # a shape the model cannot take fails here, before any work
    given = {"norm": norm, "K": K, "eps": nrpm_eps, "lam": lam, "include": include}
    settings, used = presets.resolve_settings(net, given)
    with err.status("converting"):
        converted = rs.convert(net, paradigm, gamma=gamma, delta=delta, exclude=exclude, overrides=overrides,
                               **settings)
    if recalibrate_bn:
        with err.status(f"recalibrating BatchNorm on {recalibrate_bn} batches of {data}"):
            rec = rs.recalibrate_batchnorm(converted, data, recalibrate_bn,
                                           data_root=str(data_root) if data_root else None)
        err.print(f"recalibrated {rec['batchnorm_layers']} BatchNorm layers on {rec['points']} {data} training points "
                  f"({rec['seconds']:.0f} s)")
    if used:
        err.print(f"NRPM settings from the {model} preset ({rs.preset_note(net)}): "
                  + ", ".join(f"{k}={settings[k]}" for k in used) + "; flags override")
    if paradigm in (2, 3):
        converted, _ = _run_finetune(converted, data, paradigm, adversarial, train_eps, epochs, lr, optimizer,
                                     schedule, batch_size, seed, n_train, val_n, checkpoint_dir, log, data_root, keep,
                                     adv_weight, device=device, amp=amp)
    if not is_main():  # under torchrun rank 0 writes the file and reports
        return
    report = rs.conversion_report(converted, shape)
    manifest = rs.save(converted, out)
    if as_json:
        print_json({"output": str(out), "manifest": manifest, "report": report.to_dict()})
        return
    console.print(report)
    console.print(f"saved [bold]{out}[/bold] (paradigm {paradigm}, arch {manifest['arch'] or 'unknown'})")


def resolve_device(spec: str):
    """torch.device of a --device word (robust_surgery._device)."""
    from robust_surgery._device import resolve_device as resolve

    return resolve(spec)


def is_main() -> bool:
    """Rank 0 under torchrun, or alone (robust_surgery._dist, imported only when a command runs)."""
    from robust_surgery._dist import is_main as main_rank

    return main_rank()


def _adversarial(text: str):
    return None if text.lower() in ("none", "clean", "") else text.lower()


def _check_finetune_args(paradigm, adversarial, train_eps, epochs, lr, optimizer, schedule, batch_size, seed,
                         n_train, val_n, checkpoint_dir, log, keep, adv_weight, device="auto", amp="none") -> None:
    """Refuse bad training settings and unusable checkpoint/log paths before any work starts."""
    from robust_surgery.training.finetune import FinetuneConfig, check_finetune_paths

    FinetuneConfig(paradigm=paradigm, adversarial=_adversarial(adversarial), eps=train_eps, epochs=epochs, lr=lr,
                   optimizer=optimizer, schedule=schedule, batch_size=batch_size, seed=seed, val_n=val_n,
                   n_train=n_train, keep=keep, adv_weight=adv_weight, amp=amp)
    resolve_device(device)
    check_finetune_paths(checkpoint_dir, log)


def _run_finetune(model, data, paradigm, adversarial, train_eps, epochs, lr, optimizer, schedule, batch_size, seed,
                  n_train, val_n, checkpoint_dir, log, data_root, keep, adv_weight, max_epochs_this_run=None,
                  device="auto", amp="none", sync_bn=False):
    import robust_surgery as rs

    adv = _adversarial(adversarial)
    model, history = rs.finetune(
        model, data, paradigm, adversarial=adv, eps=train_eps, epochs=epochs, lr=lr, optimizer=optimizer,
        schedule=schedule, batch_size=batch_size, seed=seed, n_train=n_train, val_n=val_n, keep=keep, adv_weight=adv_weight,
        checkpoint_dir=checkpoint_dir, log=log, data_root=str(data_root) if data_root else None, progress=True,
        max_epochs_this_run=max_epochs_this_run, device=resolve_device(device), amp=amp, sync_bn=sync_bn,
    )
    from robust_surgery._meta import get_meta

    training = get_meta(model).get("training") or {}
    if not is_main():
        return model, history

    def val_text(row):
        robust = f", val robust {row['val_robust_acc']:.1f} %" if "val_robust_acc" in row else ""
        return f"val clean {row['val_clean_acc']:.1f} %{robust}"

    if training.get("start"):
        err.print(f"start (epoch 0): {val_text(training['start'])}")
    for row in history:
        err.print(f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, {val_text(row)} ({row['seconds']:.0f} s)")
    if training.get("kept_epoch") == 0:
        err.print("[yellow]note:[/yellow] no epoch beat the starting model on the validation split; it is kept unchanged "
                  "(try another --lr, more --epochs or --optimizer adam)")
    return model, history


@app.command()
@guard
def finetune(
    model: str = typer.Argument(..., help="A converted model (.safetensors written by surgery convert)."),
    paradigm: int = typer.Option(2, "--paradigm", "-p", help="2: fine-tune λ only; 3: fine-tune everything."),
    data: str = typer.Option(..., "--data", help="Training data: mnist, cifar10 or a path."),
    adversarial: str = ADVERSARIAL,
    train_eps: float = typer.Option(0.2, "--train-eps", "--eps", help="Adversarial budget while training."),
    epochs: int = EPOCHS,
    lr: float = LR,
    optimizer: str = OPTIMIZER,
    schedule: str = SCHEDULE,
    batch_size: int = BATCH_SIZE,
    seed: int = SEED,
    n_train: Optional[int] = N_TRAIN,
    val_n: int = VAL_N,
    checkpoint_dir: Optional[Path] = CHECKPOINT_DIR,
    log: Optional[Path] = LOG,
    keep: str = KEEP,
    adv_weight: float = ADV_WEIGHT,
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Paradigm 3 under torchrun on GPUs: BatchNorm statistics "
                                 "over the global batch (SyncBatchNorm).", rich_help_panel="Fine-tuning (paradigms 2 and 3)"),
    max_epochs_this_run: Optional[int] = typer.Option(None, "--max-epochs-this-run", help="Stop after N epochs of this "
                                                      "run (needs --checkpoint-dir; the same command resumes).",
                                                      rich_help_panel="Fine-tuning (paradigms 2 and 3)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .safetensors (default: NAME.p{paradigm}.safetensors)."),
    data_root: Optional[Path] = DATA_ROOT,
    device: str = DEVICE,
    amp: str = AMP,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    as_json: bool = typer.Option(False, "--json", help="Print the epoch history as JSON on stdout."),
):
    """Continue training an already converted model (paradigm 2: λ only; 3: everything).

    Example: [bold]surgery finetune mlp.safetensors --paradigm 3 --data mnist --adversarial pgd --train-eps 0.3 --epochs 2[/bold]
    """
    import robust_surgery as rs

    out = check_out(out or Path(f"{Path(model).stem}.p{paradigm}.safetensors"), ".safetensors", "output (-o)")
    if max_epochs_this_run is not None and (max_epochs_this_run < 1 or checkpoint_dir is None):
        fail("--max-epochs-this-run N needs N >= 1 and --checkpoint-dir DIR (where the next run resumes from)", code=2)
    _check_finetune_args(paradigm, adversarial, train_eps, epochs, lr, optimizer, schedule, batch_size, seed,
                         n_train, val_n, checkpoint_dir, log, keep, adv_weight, device, amp)
    with err.status(f"loading {model}"):
        net = rs.load_model(model, trust_pickle=trust_pickle, trust_code=trust_code,
                            data_root=str(data_root) if data_root else None)
    net, history = _run_finetune(net, data, paradigm, adversarial, train_eps, epochs, lr, optimizer, schedule,
                                 batch_size, seed, n_train, val_n, checkpoint_dir, log, data_root, keep, adv_weight,
                                 max_epochs_this_run, device, amp, sync_bn)
    if not is_main():  # under torchrun rank 0 writes the file and reports
        return
    if len(history) < epochs:  # stopped early: the checkpoint holds the run, no model file yet
        err.print(f"stopped after epoch {len(history)} of {epochs}; run the same command again to continue")
        return
    rs.save(net, out)
    if as_json:
        print_json({"output": str(out), "history": history})
    else:
        console.print(f"saved [bold]{out}[/bold] (paradigm {paradigm}, kept epoch "
                      f"{rs.read_manifest(out)['training']['kept_epoch']})")


@app.command()
@guard
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    K: int = typer.Option(3, "--K", "-K", help="IRLS steps to estimate the cost for."),
    norm: str = typer.Option("L1", "--norm", help="Reweighting to estimate the cost for."),
    lam: float = typer.Option(0.5, "--lam", help="λ to estimate the cost for."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="C,H,W of one input (zoo models know theirs)."),
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    data_root: Optional[Path] = DATA_ROOT,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
):
    """List the convertible layers of a model (or the NRPM layers of a converted one) with their cost.

    Example: [bold]surgery inspect zoo:cifar-resnet20 --K 1[/bold]
    """
    import robust_surgery as rs

    with err.status(f"loading {model}"):
        net = rs.load_model(model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                            trust_pickle=trust_pickle, trust_code=trust_code,
                            data_root=str(data_root) if data_root else None)
    shape = _input_shape(input_shape, net)
    if rs.nrpm_layers(net):
        report = rs.conversion_report(net, shape)
    else:
        cfg = rs.LayerConfig(rs.NRPMSettings(norm=norm, K=K), lam)
        report = rs.inspect_model(net, shape, cfg)
    if as_json:
        print_json(report.to_dict())
    else:
        console.print(report)


def _floats(text: Optional[str], what: str) -> Optional[list[float]]:
    if not text:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{what} takes numbers separated by commas, got {text!r}", code=2)


@app.command()
@guard
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help="mnist, cifar10, or a path (ImageFolder tree or .pt with images/labels)."),
    suite: Optional[str] = typer.Option(None, "--suite", help="standard (default): AutoAttack at its real strength (APGD-CE, APGD-T 100 iterations × 9 targets, FAB-T, Square 5000 queries) plus, on converted models, PGD, stronger PGD, transfer from λ = 1, BPDA, Square and FGSM at every ε; quick: FGSM + PGD-20 (smoke test, not adaptive); paper: PGD-20 (the NRPM paper's protocol, not a worst case)."),
    attack: Optional[str] = typer.Option(None, "--attack", help="Instead of a suite, your own comma-separated list: fgsm, pgd, cw, autoattack (the standard version at its real strength), apgd-ce, apgd-t, fab-t, apgd (APGD-CE + APGD-DLR), square; on converted models also transfer (PGD with the λ = 1 network's gradients) and bpda (PGD through the straight-through surrogate). The report card's attacks join on converted models unless --no-checks."),
    per_attack: bool = typer.Option(False, "--per-attack", help="Run every attack on every point for its own column (default: the cascade, each attack on the points every earlier one left robust: the same worst case, far cheaper)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="Budgets, comma-separated, fractions allowed: 0,0.1,0.3 or 8/255 (default: the data set's standard)."),
    threat: str = typer.Option("Linf", "--threat", help="Linf or L2."),
    n: Optional[int] = typer.Option(None, "--n", "--n-examples", help="Evaluate the first N test points (--n-examples under torchrun, whose own options --n would clash with)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Points per batch (also the unit of sharding and resuming)."),
    seed: int = typer.Option(0, "--seed", help="Seed of random starts and AutoAttack."),
    steps: int = typer.Option(20, "--steps", help="PGD steps."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="PGD step size (default 2.5·ε/steps)."),
    restarts: int = typer.Option(1, "--restarts", help="PGD restarts."),
    queries: int = typer.Option(1000, "--queries", help="Square attack queries."),
    compare_original: bool = typer.Option(False, "--compare-original", help="Also evaluate the λ = 1 (original) network."),
    no_checks: bool = typer.Option(False, "--no-checks", help="Skip the sanity report card and its attacks (on by default for converted models); the worst case is then not adaptive, and the output says so."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean if the model expects normalised inputs: 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, with --mean."),
    state: Optional[Path] = typer.Option(None, "--state", help="Keep per-point results here; an interrupted run resumes from it."),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", help="Stop after this many new batches (resume later with --state)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the robust-accuracy curve as PNG."),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    trust_pickle: bool = TRUST_PICKLE,
    trust_code: bool = TRUST_CODE,
    data_root: Optional[Path] = DATA_ROOT,
    device: str = DEVICE,
    amp: str = AMP,
):
    """Attack a model over an ε sweep and print robust accuracy with the sanity report card.

    Example: [bold]surgery evaluate zoo:mnist-mlp --data mnist --eps 0,0.1,0.3 --n 1000[/bold] (the standard suite)
    Smoke test: [bold]surgery evaluate zoo:mnist-mlp --data mnist --suite quick --n 200[/bold]
    Sharded: [bold]torchrun --nproc-per-node 2 -m robust_surgery.cli.app evaluate MODEL --data mnist --n-examples 1000[/bold]
    """
    import robust_surgery as rs
    from robust_surgery.evaluation.budgets import parse_eps

    root = str(data_root) if data_root else None
    check_out(json_out, None, "report (--json)")
    check_out(plot, ".png", "plot (--plot)")
    eps_values = parse_eps(eps) if eps is not None else None
    with err.status(f"loading {model}"):
        net = rs.load_model(model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                            trust_pickle=trust_pickle, trust_code=trust_code, data_root=root)
    report = rs.evaluate(
        net, data, suite=suite, attacks=None if attack is None else [a for a in attack.split(",") if a.strip()],
        per_attack=per_attack, eps=eps_values,
        threat=threat, n=n, batch_size=batch_size, seed=seed, steps=steps, alpha=alpha, restarts=restarts,
        queries=queries, compare_original=compare_original, checks=False if no_checks else None,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), data_root=root, state=state,
        max_batches=max_batches, progress=True, architecture=model if ":" in model else None,
        device=resolve_device(device), amp=amp,
    )
    if not is_main():  # under torchrun only rank 0 reports
        return
    if json_out is not None:
        if str(json_out) == "-":
            print_json(report.to_dict())
        else:
            write_json(report.to_dict(), json_out)
    if plot is not None:
        from robust_surgery.evaluation.plot import plot_robustness_curve

        plot_robustness_curve(report, plot)
    if str(json_out) != "-":
        console.print(report)
        if not report.complete:
            err.print(f"partial run: {report.batches_done}/{report.batches_total} batches; run again with the same --state to finish")


@zoo_app.command("list")
@guard
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout.")):
    """List the zoo models.

    Example: [bold]surgery zoo list[/bold]
    """
    from rich.table import Table

    from robust_surgery.io.zoo_catalog import catalog

    entries = catalog()  # from a JSON file: listing the zoo does not import torch
    if as_json:
        print_json(entries)
        return
    t = Table(title="Model zoo (use as zoo:NAME)")
    for c in ("name", "dataset", "input", "ref. acc"):
        t.add_column(c, no_wrap=True)
    t.add_column("description", ratio=1)
    for e in entries:
        t.add_row(e["name"], e["dataset"], "×".join(map(str, e["input_shape"])),
                  "-" if e["reference_acc"] is None else f"{e['reference_acc']:.2f} %", escape(e["description"]))
    console.print(t)


@zoo_app.command("card")
@guard
def zoo_card(name: str = typer.Argument(..., help="A zoo model with a card (the hardened ones): mnist-lenet-p3, ...")):
    """Print a zoo model's card: recipe, training cost, evaluation table, Hugging Face model-index
    front matter and a RobustBench entry (Markdown, publishable as is).

    Example: [bold]surgery zoo card mnist-lenet-at[/bold]
    """
    from robust_surgery.io.cards import read_card

    print(read_card(name), end="")


@zoo_app.command("train")
@guard
def zoo_train(
    name: str = typer.Argument(..., help="Zoo model to retrain from scratch (mnist-mlp, mnist-lenet, minilm-sentiment's head, ...)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the recipe's)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the recipe's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (default: the recipe's)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Train on the first N training images only."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .safetensors (default: NAME.trained.safetensors)."),
    device: str = DEVICE,
    amp: str = AMP,
    data_root: Optional[Path] = DATA_ROOT,
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
):
    """Retrain a zoo model from scratch with its recipe and save it (minilm-sentiment: refit its head).

    Example: [bold]surgery zoo train mnist-mlp --epochs 2 -o mlp.safetensors[/bold]
    """
    import robust_surgery as rs
    from robust_surgery.model_zoo.train import train_zoo_model

    out = check_out(out or Path(f"{name}.trained.safetensors"), ".safetensors", "output (-o)")
    model, metrics = train_zoo_model(name, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                     data_root=str(data_root) if data_root else None, n_train=n_train,
                                     device=device, amp=amp)
    if not is_main():  # under torchrun rank 0 writes the file and reports
        return
    rs.save(model, out, arch=metrics.get("arch", f"zoo:{name}"), training=metrics)
    if as_json:
        print_json({"output": str(out), **metrics})
        return
    how = f"after {metrics['epochs']} epochs" if "epochs" in metrics else f"(head fitted, C = {metrics['C']:g})"
    console.print(f"{name}: test accuracy {metrics['test_acc']:.2f} % ({metrics['test_correct']}/{metrics['test_n']}) "
                  f"{how} in {metrics['seconds']:.0f} s; saved [bold]{out}[/bold]")


def _register_extensions() -> None:
    from . import diagnostics_cmds, reprogram_cmds

    diagnostics_cmds.register(app)
    reprogram_cmds.register(app)


_register_extensions()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
