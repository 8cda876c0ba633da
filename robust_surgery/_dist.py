"""Process groups for torchrun: who this process is, and the few collective steps the loops need.

Alone, a process is rank 0 of 1 and every helper here is a no-op. Under ``torchrun``
(``WORLD_SIZE`` > 1) the default process group is initialised on first use: NCCL when CUDA is
available, else gloo. The evaluation shards batches over ranks and sums per-point results; the
training loop shards each global batch over ranks and averages gradients (``docs/python-api.md``,
distributed).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

__all__ = ["dist_info", "all_reduce_sum_", "is_main", "shard", "average_gradients_", "synchronized_batchnorm"]


def _env_int(name: str, default: str | None, *, minimum: int) -> int | None:
    """An integer environment variable set by torchrun, checked: a clear error for anything else."""
    text = os.environ.get(name, default)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        from robust_surgery.errors import InvalidInputError

        raise InvalidInputError(f"the environment variable {name}={text!r} must be a whole number >= {minimum} "
                                "(torchrun sets it); unset it to run as one process")
    return value


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) alone; under torchrun (WORLD_SIZE > 1) the process
    group is initialised on first call (NCCL with CUDA, else gloo)."""
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", "1", minimum=1)
    if world > 1 and not dist.is_initialized():
        rank = _env_int("RANK", None, minimum=0)
        if rank is not None and rank >= world:
            from robust_surgery.errors import InvalidInputError

            raise InvalidInputError(f"RANK={rank} is outside the world of WORLD_SIZE={world} processes (ranks 0 to "
                                    f"{world - 1}); start the processes with torchrun, which sets both")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                from robust_surgery.errors import InvalidInputError

                raise InvalidInputError(f"WORLD_SIZE={world} asks for several processes but {name} is not set; start "
                                        "them with torchrun (it sets MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (the process that writes files and prints results), and when alone."""
    return dist_info()[0] == 0


def all_reduce_sum_(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum ``t`` over the ``world`` ranks in place (nothing when alone); returns ``t``."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(index: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous part of ``index`` (sizes differ by at most one; the whole when alone)."""
    return index if world == 1 else index.tensor_split(world)[rank]


def average_gradients_(params, world: int, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the gradients of ``params`` over the ranks and divide by ``world`` (what DistributedDataParallel
    does after backward), one all-reduce of one flat buffer per dtype; ``extra`` (a small tensor, e.g.
    the batch loss) rides along in its dtype's buffer and comes back summed (not divided)."""
    summed = None if extra is None else extra.detach().clone()
    groups: dict = {}  # dtype -> [(tensor, is a gradient)]
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.dtype, []).append((p.grad, True))
    if summed is not None:
        groups.setdefault(summed.dtype, []).append((summed, False))
    for items in groups.values():
        flat = all_reduce_sum_(torch.cat([t.reshape(-1) for t, _ in items]), world)
        n = 0
        for t, is_grad in items:
            part = flat[n:n + t.numel()].view_as(t)
            t.copy_(part / world if is_grad else part)
            n += t.numel()
    return summed


@contextlib.contextmanager
def synchronized_batchnorm(model: nn.Module, enabled: bool = True):
    """Inside the block every BatchNorm of ``model`` is a SyncBatchNorm sharing its parameters and
    buffers, so training-mode statistics are taken over the global batch of all ranks (what
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, undone on exit so the model keeps its own
    classes). Nothing changes when alone or not ``enabled``. Every rank must run the same forwards.
    torch's SyncBatchNorm runs on GPUs only: a model on another device is a clear error."""
    if not enabled or dist_info()[1] == 1:
        yield model
        return
    if any(p.device.type != "cuda" for p in model.parameters()):
        from robust_surgery.errors import InvalidInputError

        raise InvalidInputError("sync_bn (--sync-bn) needs CUDA: torch's SyncBatchNorm runs on GPUs only; on CPU "
                                "leave it off (each rank then normalises by its own share of the batch)")
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats)
                for attr in ("weight", "bias"):
                    setattr(sync, attr, getattr(child, attr))
                for attr in ("running_mean", "running_var", "num_batches_tracked"):
                    setattr(sync, attr, getattr(child, attr))
                sync.train(child.training)
                setattr(parent, name, sync)
                swapped.append((parent, name, child, sync))
    try:
        yield model
    finally:
        for parent, name, child, sync in swapped:
            child.train(sync.training)
            setattr(parent, name, child)
