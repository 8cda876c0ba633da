"""Options several commands share, declared once (Typer reuses one OptionInfo per option).

The fine-tuning defaults are FinetuneConfig's (``robust_surgery.training.finetune``); they are written as
literals so that ``surgery --help`` does not import torch, and a test pins them to the library's.
"""
from __future__ import annotations

import typer

TRUST_PICKLE = typer.Option(False, "--trust-pickle", help="Allow loading a whole pickled module (a .pt that is not a "
                            "state_dict): unpickling runs code from the file. Only for files you trust.")
DATA_ROOT = typer.Option(None, "--data-root", help="Where the data sets and reference checkpoints live (else "
                         "$ROBUST_SURGERY_DATA, then the download cache).")
TRUST_CODE = typer.Option(False, "--trust-code", help="Allow a saved model's manifest to import and call the "
                          "package.module:Callable it names (like transformers' trust_remote_code). Only for files you trust.")

_FT = "Fine-tuning (paradigms 2 and 3)"
ADVERSARIAL = typer.Option("fgsm", "--adversarial", help="fgsm, pgd or none (clean batches).", rich_help_panel=_FT)
EPOCHS = typer.Option(1, "--epochs", help="Epochs.", rich_help_panel=_FT)
LR = typer.Option(1e-3, "--lr", help="Learning rate.", rich_help_panel=_FT)
OPTIMIZER = typer.Option("sgd", "--optimizer", help="sgd (momentum 0.9) or adam.", rich_help_panel=_FT)
SCHEDULE = typer.Option("constant", "--schedule", help="constant, cosine or step.", rich_help_panel=_FT)
BATCH_SIZE = typer.Option(64, "--batch-size", help="Batch size.", rich_help_panel=_FT)
SEED = typer.Option(0, "--seed", help="Seed.", rich_help_panel=_FT)
N_TRAIN = typer.Option(None, "--n-train", help="Train on the first N training points.", rich_help_panel=_FT)
VAL_N = typer.Option(1000, "--val-n", help="Held-out points (end of the training split) for picking the best epoch.",
                     rich_help_panel=_FT)
CHECKPOINT_DIR = typer.Option(None, "--checkpoint-dir", help="Checkpoint after every epoch here; rerun to resume.",
                              rich_help_panel=_FT)
# --log-file: torchrun reads "--log" as an ambiguous prefix of its own --log-dir/--log-... options
LOG = typer.Option(None, "--log", "--log-file", help="Write the per-epoch JSON log here (--log-file under torchrun).",
                   rich_help_panel=_FT)
KEEP = typer.Option("best", "--keep", help="best: the best validated epoch (the model before fine-tuning counts as "
                    "epoch 0); last: the last epoch.", rich_help_panel=_FT)
ADV_WEIGHT = typer.Option(0.5, "--adv-weight", help="Adversarial share w of the loss (1-w)·CE(clean) + w·CE(adv); "
                          "1 = adversarial batches only.", rich_help_panel=_FT)

DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available, cuda:LOCAL_RANK under torchrun), cpu, "
                      "cuda or cuda:N.")
AMP = typer.Option("none", "--amp", help="Mixed precision: none, bf16 or fp16 (autocast; NRPM estimates stay float32).")

ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help='Keyword arguments for the architecture\'s constructor, as JSON: '
                           '\'{"num_classes": 10}\' (timm:, torchvision:, package.module:Callable specs and --arch).')


def parse_arch_kwargs(text: str | None) -> dict | None:
    """The --arch-kwargs JSON object, or None; a clear error for anything else."""
    import json

    from .render import fail

    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--arch-kwargs must be a JSON object such as '{{\"num_classes\": 10}}': {e}", code=2)
    except RecursionError:
        fail("--arch-kwargs is nested too deeply to be constructor arguments; give a flat JSON object such as "
             "'{\"num_classes\": 10}'", code=2)
    if not isinstance(value, dict):
        fail(f"--arch-kwargs must be a JSON object such as '{{\"num_classes\": 10}}', got {text!r}", code=2)
    return value
