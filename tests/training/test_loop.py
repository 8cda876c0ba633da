"""The one training loop: best-epoch selection, resume equals an uninterrupted run, the log, NaN stops."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_surgery.errors import NonFiniteError
from robust_surgery.training.loop import BatchLoss, make_optimizer, train_loop


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def _run(model, x, y, epochs, **kw):
    opt = make_optimizer(model.parameters(), "sgd", 0.1)
    step = lambda xb, yb, epoch, s: BatchLoss(F.cross_entropy(model(xb), yb), {"seen": len(xb)})  # noqa: E731
    order = lambda epoch: torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # noqa: E731
    return train_loop(model, opt, x, y, step, epochs=epochs, batch_size=16, order=order, **kw)


def test_rows_losses_and_summed_extras():
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    result = _run(model, x, y, 3, lr_at=lambda e: 0.1 / (e + 1))
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["lr"] for r in result.history] == [0.1, 0.05, 0.1 / 3]
    assert all(r["seen"] == 64 for r in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_epoch is None and not model.training


def test_the_best_epoch_comes_back_and_the_start_counts_as_epoch_0():
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([10.0, 30.0, 20.0])  # epoch 2 is best
    snapshots = {}

    def end_epoch(epoch):
        snapshots[epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val": next(scores)}

    result = _run(model, x, y, 3, end_epoch=end_epoch, score=lambda r: r.get("val", 5.0), start_row=lambda: {})
    assert result.best_epoch == 2 and result.start == {}
    assert all(torch.equal(model.state_dict()[k], snapshots[2][k]) for k in start)
    # nothing beats a start scored 100: the model comes back unchanged
    model2 = nn.Linear(5, 2)
    model2.load_state_dict(start)
    result = _run(model2, x, y, 2, end_epoch=lambda e: {"val": 1.0}, score=lambda r: r.get("val", 100.0),
                  start_row=lambda: {})
    assert result.best_epoch == 0 and all(torch.equal(model2.state_dict()[k], start[k]) for k in start)


def test_a_stopped_run_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    x, y = _problem()
    torch.manual_seed(0)
    whole = nn.Linear(5, 2)
    init = {k: v.clone() for k, v in whole.state_dict().items()}
    want = _run(whole, x, y, 3, log=tmp_path / "whole.json")
    part = nn.Linear(5, 2)
    part.load_state_dict(init)
    ckpt = tmp_path / "ckpt.pt"
    first = _run(part, x, y, 3, checkpoint=ckpt, record="r", max_epochs_this_run=2)
    assert len(first.history) == 2 and ckpt.exists()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["record"] == "r" and saved["epoch"] == 2
    fresh = nn.Linear(5, 2)
    rest = _run(fresh, x, y, 3, checkpoint=ckpt, record="r", resume=saved)
    assert [r["train_loss"] for r in rest.history] == [r["train_loss"] for r in want.history]
    assert all(torch.equal(fresh.state_dict()[k], whole.state_dict()[k]) for k in init)
    assert [r["epoch"] for r in json.loads((tmp_path / "whole.json").read_text())] == [1, 2, 3]


def test_a_nan_loss_stops_with_a_clear_error():
    x, y = _problem()
    model = nn.Linear(5, 2)
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    step = lambda xb, yb, e, s: BatchLoss(model(xb).sum() * float("nan"))  # noqa: E731
    with pytest.raises(NonFiniteError, match="loss is nan at epoch 1, step 1.*Lower --lr"):
        train_loop(model, opt, x, y, step, epochs=1, batch_size=16, order=lambda e: torch.arange(len(x)))


def test_a_run_killed_inside_an_epoch_resumes_at_the_next_step_with_the_same_result(tmp_path):
    x, y = _problem()
    torch.manual_seed(0)
    whole = nn.Linear(5, 2)
    init = {k: v.clone() for k, v in whole.state_dict().items()}
    want = _run(whole, x, y, 2)
    part = nn.Linear(5, 2)
    part.load_state_dict(init)
    ckpt = tmp_path / "ckpt.pt"
    opt = make_optimizer(part.parameters(), "sgd", 0.1)
    calls = []

    def step(xb, yb, epoch, s):
        if (epoch, s) == (1, 3):  # the process dies inside the second epoch, after step 2's checkpoint
            raise KeyboardInterrupt
        calls.append((epoch, s))
        return BatchLoss(F.cross_entropy(part(xb), yb), {"seen": len(xb)})

    order = lambda epoch: torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        train_loop(part, opt, x, y, step, epochs=2, batch_size=16, order=order, checkpoint=ckpt, record="r",
                   checkpoint_every=2)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 1 and saved["partial"]["step"] == 2
    fresh = nn.Linear(5, 2)
    calls.clear()
    rest = _run(fresh, x, y, 2, checkpoint=ckpt, record="r", resume=saved, checkpoint_every=2)
    assert [r["train_loss"] for r in rest.history] == [r["train_loss"] for r in want.history]
    assert rest.history[-1]["seen"] == 64
    assert all(torch.equal(fresh.state_dict()[k], whole.state_dict()[k]) for k in init)
