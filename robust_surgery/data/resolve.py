"""The one data resolver: every command turns its ``data`` argument into tensors here.

A data spec is one of

* ``"mnist"``, ``"cifar10"`` or a path (ImageFolder tree, tar of one, ``.pt`` file): read from
  local files by :func:`robust_surgery.data.datasets.load_dataset` (``--data-root``,
  ``$ROBUST_SURGERY_DATA``, see ``docs/data.md``);
* ``"synthetic[:key=value,...]"`` or a :class:`~robust_surgery.purification.synthetic.SparseCodingTask`:
  the synthetic sparse-coding task, whose true features are known (``docs/purification.md``);
* an ``(images, labels)`` pair of tensors or a ``TensorDataset``;
* a bare image tensor (labels None; only where labels are not needed, e.g. BatchNorm recalibration);
* for sequence models: a peptide task name or folder, or a ``PeptideTask`` (:func:`resolve_sequence_task`).

Evaluation, fine-tuning, pretraining, recalibration, purification diagnostics and reprogramming all
call :func:`resolve_data`, so a spec means the same thing to every command.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from robust_surgery.errors import InvalidInputError, InvalidTypeError

__all__ = ["ResolvedData", "resolve_data", "resolve_sequence_task"]


@dataclass
class ResolvedData:
    """What a data spec resolved to: images (N, C, H, W) float in [0, 1] (or the synthetic task's
    pixels), labels (N,) int64 or None, a short name for reports, and the synthetic task if any."""

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    name: str
    task: object = None  # SparseCodingTask for synthetic specs

    @property
    def tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(images, labels)."""
        return self.images, self.labels


def _synthetic_task(data):
    if isinstance(data, str) and not data.strip().lower().startswith("synthetic"):
        return None  # not a synthetic spec: no need to import the synthetic module
    from robust_surgery.purification.synthetic import SparseCodingTask, parse_synthetic_spec

    if isinstance(data, SparseCodingTask):
        return data
    return parse_synthetic_spec(data) if isinstance(data, str) else None


def _refuse_special_file(data) -> None:
    """A data path that exists must be a regular file or a folder: reading a FIFO, a socket or a
    device would block or never end."""
    import stat

    if str(data) in ("mnist", "cifar10") or not os.path.lexists(data):
        return
    try:
        mode = os.stat(data).st_mode
    except OSError:
        raise InvalidInputError(f"the data path {data} is a dangling link (it points to a file that does not exist); "
                                "give the data set's real path") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise InvalidInputError(f"the data path {data} is not a file or a folder (a pipe, socket or device), which "
                                "would block or never end; give a data set's folder or file")


def resolve_data(data, split: str = "test", *, n: Optional[int] = None, data_root=None,
                 labels: bool = True) -> ResolvedData:
    """Resolve a data spec (see the module docstring) to tensors of ``split`` (``"train"``/``"test"``;
    ignored for tensors given directly). ``n``: keep the first ``n`` points (an error when fewer
    exist). ``labels=False`` also accepts a bare image tensor."""
    from torch.utils.data import TensorDataset

    task = None if isinstance(data, (torch.Tensor, tuple, list, TensorDataset)) else _synthetic_task(data)
    if task is not None:
        x, y = task.tensors(split)
        name = "synthetic"
    elif isinstance(data, (str, os.PathLike)):
        from robust_surgery.data.datasets import load_dataset

        _refuse_special_file(data)
        ds = load_dataset(data, split, root=data_root, n=n)
        x, y = ds.tensors
        name = str(data) if str(data) in ("mnist", "cifar10") else Path(data).name
        return ResolvedData(x, y, name)
    elif isinstance(data, TensorDataset):
        x, y = data.tensors[:2]
        name = "custom"
    elif isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]) and torch.is_tensor(data[1]):
        x, y = data
        name = "custom"
    elif torch.is_tensor(data) and not labels:
        x, y, name = data, None, "custom"
    else:
        pair = "an (images, labels) pair" + ("" if labels else " or an image tensor")
        raise InvalidTypeError(f"data must be 'mnist', 'cifar10', a path, 'synthetic[:...]', a TensorDataset or "
                               f"{pair}; got {type(data).__name__}")
    if n is not None:
        n = int(n)
        if n < 1:
            raise InvalidInputError(f"n must be a positive number of points, got {n}")
        if n > len(x):
            raise InvalidInputError(f"n = {n} is more than the {len(x)} points available")
        x, y = x[:n], (None if y is None else y[:n])
    return ResolvedData(x, y, name, task)


def resolve_sequence_task(data, data_root=None):
    """A sequence task for R2DL: a ``PeptideTask`` as is, else a built-in peptide task name or a task
    folder read by :func:`robust_surgery.data.sequences.load_peptide_task`."""
    from robust_surgery.data.sequences import PeptideTask, load_peptide_task

    return data if isinstance(data, PeptideTask) else load_peptide_task(data, data_root)
