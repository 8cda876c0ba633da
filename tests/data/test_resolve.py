"""The one data resolver: every spec form, and the errors."""
import pytest
import torch
from torch.utils.data import TensorDataset

from robust_surgery.data.resolve import resolve_data
from robust_surgery.errors import InvalidInputError, InvalidTypeError
from robust_surgery.purification.synthetic import SparseCodingTask


def test_pairs_datasets_and_bare_tensors():
    x, y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
    r = resolve_data((x, y), n=4)
    assert r.name == "custom" and r.task is None
    assert torch.equal(r.images, x[:4]) and torch.equal(r.labels, y[:4])
    r = resolve_data(TensorDataset(x, y))
    assert torch.equal(r.images, x) and torch.equal(r.labels, y)
    r = resolve_data(x, labels=False)
    assert r.labels is None and torch.equal(r.images, x)
    with pytest.raises(InvalidTypeError, match="an \\(images, labels\\) pair; got Tensor"):
        resolve_data(x)  # labels are needed: a bare tensor is refused


def test_n_more_than_available_or_not_positive_is_an_error():
    x, y = torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="n = 6 is more than the 5 points available"):
        resolve_data((x, y), n=6)
    with pytest.raises(InvalidInputError, match="n must be a positive number of points, got 0"):
        resolve_data((x, y), n=0)


def test_synthetic_specs_and_tasks_give_the_task_and_its_split():
    task = SparseCodingTask(d=8, k=2, n_train=40, n_test=20)
    r = resolve_data(task, "test")
    want_x, want_y = task.tensors("test")
    assert r.task is task and r.name == "synthetic"
    assert torch.equal(r.images, want_x) and torch.equal(r.labels, want_y)
    r = resolve_data("synthetic:d=8,k=2,n_train=40,n_test=20", "train", n=10)
    assert r.task == task and r.images.shape == (10, 1, 1, 8)
    assert torch.equal(r.images, task.tensors("train")[0][:10])


def test_names_and_paths_read_local_files(shared_data):
    r = resolve_data("mnist", "test", n=100)
    assert r.name == "mnist" and r.images.shape == (100, 1, 28, 28) and r.labels.dtype == torch.int64
    assert 0.0 <= float(r.images.min()) and float(r.images.max()) <= 1.0


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInputError, match="Unknown data set 'mnsit'.*Did you mean 'mnist'"):
        resolve_data("mnsit")
    with pytest.raises(InvalidTypeError, match="data must be 'mnist'"):
        resolve_data(42)
