"""Issue 31: a saved model that would hang or compute silently wrong numbers is refused with one
`error:` line (exit 1): a layer's K beyond the bound, an unknown format version, a weight of the wrong
kind of dtype."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.io.model_file import MANIFEST_KEY

runner = CliRunner()


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    rs.save(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), lam=0.6, K=1), path)
    return path


def _edit(path, manifest_fn=None, tensor_fn=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    if manifest_fn:
        m = json.loads(meta[MANIFEST_KEY])
        manifest_fn(m)
        meta[MANIFEST_KEY] = json.dumps(m)
    if tensor_fn:
        tensor_fn(tensors)
    save_file(tensors, str(path), metadata=meta)


def _one_error(path, match):
    """Run evaluate on ``path`` as the CLI would: one `error:` line naming the problem, exit 1, the file unchanged."""
    before = path.read_bytes()
    res = runner.invoke(app, ["evaluate", str(path), "--data", "mnist", "--n", "4", "--suite", "quick"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output
    assert path.read_bytes() == before


def test_a_huge_K_in_a_manifest_is_refused_not_run(saved):
    _edit(saved, manifest_fn=lambda m: m["layers"]["fc1"].update(K=1_000_000_000))
    _one_error(saved, "K (IRLS steps) must be a whole number from 0 to 100, got 1000000000")
    with pytest.raises(ValueError, match="from 0 to 100"):
        rs.convert(rs.load_model("zoo:mnist-mlp-rs"), K=101)


def test_an_unknown_format_version_is_refused(saved):
    _edit(saved, manifest_fn=lambda m: m.update(format="robust-surgery/999"))
    _one_error(saved, "format 'robust-surgery/999', which this version does not read (it reads robust-surgery/1)")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_weight_of_the_wrong_dtype_is_refused(saved, dtype):
    _edit(saved, tensor_fn=lambda t: t.update({"fc1.weight": t["fc1.weight"].to(dtype)}))
    _one_error(saved, "tensor fc1.weight is stored as")


@pytest.mark.parametrize("edit", ["missing", "extra"])
def test_a_missing_or_extra_tensor_is_named_not_a_traceback(saved, edit):
    def change(t):
        if edit == "missing":
            del t["fc2.bias"]
        else:
            t["fc9.weight"] = torch.zeros(2, 2)

    _edit(saved, tensor_fn=change)
    _one_error(saved, "missing tensors ['fc2.bias']" if edit == "missing" else "unexpected tensors ['fc9.weight']")


def test_deep_json_and_long_names_are_error_lines(saved, tmp_path):
    deep = "[" * 100000 + "]" * 100000
    _edit(saved, manifest_fn=lambda m: m.update(arch_kwargs={"x": 1}))
    with safe_open(str(saved), framework="pt") as f:
        meta = dict(f.metadata())
    meta[MANIFEST_KEY] = meta[MANIFEST_KEY][:-1] + ', "deep": ' + deep + "}"
    save_file(load_file(str(saved)), str(saved), metadata=meta)
    _one_error(saved, "nested too deeply")
    res = runner.invoke(app, ["convert", "zoo:mnist-mlp-rs", "--arch-kwargs", '{"a": ' + deep + "}", "-o",
                              str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and res.output.count("error: --arch-kwargs is nested too deeply") == 1, res.output
    res = runner.invoke(app, ["convert", "zoo:mnist-mlp-rs", "-o", str(tmp_path / ("n" * 300 + ".safetensors"))])
    assert res.exit_code == 1 and "name is too long" in res.output and "Traceback" not in res.output, res.output


def test_a_fifo_or_a_dangling_link_as_data_is_refused_at_once(saved, tmp_path):
    import os

    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name, match in (("fifo", "is not a file or a folder (a pipe, socket or device)"), ("dangling", "dangling link")):
        res = runner.invoke(app, ["evaluate", str(saved), "--data", str(tmp_path / name), "--suite", "quick", "--n", "4"])
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and match in lines[0], res.output


def test_silent_accepts_are_now_errors(saved, monkeypatch):
    """inspect --lam nan, --eps with an empty value, --max-batches 0/-1, a bad WORLD_SIZE; lam=True and
    eps=("0.1",) in Python."""
    cases = [
        (["inspect", "zoo:mnist-mlp-rs", "--lam", "nan"], "lam (λ) must be in [0, 1] (1 = the original layer, 0 = pure NRPM), got nan"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--eps", "0.1,,0.2"],
         "--eps has an empty value between commas"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--max-batches", "0"],
         "max_batches (--max-batches) must be a whole number >= 1"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--max-batches", "-1"],
         "max_batches (--max-batches) must be a whole number >= 1"),
    ]
    before = saved.read_bytes()
    for args, match in cases:
        res = runner.invoke(app, args)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], \
            (args, res.output)
    assert saved.read_bytes() == before
    for world, match in (("-3", "WORLD_SIZE='-3' must be a whole number >= 1"), ("abc", "WORLD_SIZE='abc'")):
        monkeypatch.setenv("WORLD_SIZE", world)
        res = runner.invoke(app, ["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick"])
        assert res.exit_code == 1 and match in res.output and "Traceback" not in res.output, res.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    res = runner.invoke(app, ["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick"])
    assert res.exit_code == 1 and "MASTER_ADDR is not set" in res.output, res.output
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(TypeError, match="lam"):
        rs.convert(rs.load_model("zoo:mnist-mlp-rs"), lam=True)
    with pytest.raises(TypeError, match="write 0.1, not '0.1'"):
        rs.evaluate(rs.load(saved), "mnist", suite="quick", eps=("0.1",), n=4)


def test_a_killed_writes_temporary_is_removed_by_the_next_write_and_only_ours(tmp_path):
    import os
    import subprocess
    import sys

    from robust_surgery._files import _tmp_marker, atomic_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    stale = tmp_path / f".big.safetensors{_tmp_marker(pid)}abc123.tmp"
    live = tmp_path / f".other.json{_tmp_marker(os.getpid())}def456.tmp"  # a writer that still runs
    foreign = tmp_path / ".something.else.tmp"  # not ours
    for f in (stale, live, foreign):
        f.write_text("x")
    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and live.exists() and foreign.exists() and (tmp_path / "out.json").read_text() == "{}"


def test_misleading_messages_now_say_what_is_wrong(saved, tmp_path):
    import os

    os.symlink(tmp_path / "gone.json", tmp_path / "dangling.json")
    res = runner.invoke(app, ["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--json",
                              str(tmp_path / "dangling.json")])
    assert res.exit_code == 1 and "is a dangling link" in res.output and "device, socket or pipe" not in res.output
    torch.save({"fc1.weight": torch.zeros(2)}, tmp_path / "weights.pt")
    res = runner.invoke(app, ["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--state",
                              str(tmp_path / "weights.pt")])
    assert res.exit_code == 1 and "has no run record (it holds tensors by name: a model's weights?)" in res.output
    assert "older version" not in res.output
    res = runner.invoke(app, ["finetune", str(saved), "--data", "mnist", "--train-eps", "-1"])
    assert res.exit_code == 1 and "budget eps (--train-eps) must be >= 0, got -1" in res.output, res.output


def test_data_that_does_not_fit_the_model_says_which_shape_it_expects(saved):
    res = runner.invoke(app, ["evaluate", str(saved), "--data", "cifar10", "--n", "4", "--suite", "quick"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "its images have shape (3, 32, 32)" in lines[0] and "it expects images of shape (1, 28, 28)" in lines[0]


def test_settings_that_scale_work_are_bounded_and_seeds_fit_torch(saved):
    from robust_surgery.limits import LIMITS

    cases = [
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--attack", "pgd", "--steps", "10000000"],
         "steps (--steps) must be a whole number >= 1 and at most 10,000, got 10000000"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--attack", "pgd", "--restarts", "1000"],
         "restarts (--restarts) must be a whole number >= 1 and at most 100"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--attack", "square", "--queries", "99999999"],
         "queries (--queries) must be a whole number >= 1 and at most 1,000,000"),
        (["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--seed", str(2 ** 70)],
         "the seed (--seed) must be a whole number from 0 to 2**63 - 1"),
        (["finetune", str(saved), "--data", "mnist", "--epochs", "100000"], "epochs (--epochs) must be a whole number >= 1 and at most 10,000"),
        (["zoo", "train", "mnist-mlp", "--lr", "nan"], "lr (--lr) must be a finite number > 0, got nan"),
        (["zoo", "train", "mnist-mlp", "--n-train", "0"], "n_train (--n-train) must be a whole number >= 1"),
    ]
    for args, match in cases:
        res = runner.invoke(app, args)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and match in lines[0], (args, res.output)
    assert LIMITS["K"] == 100


def test_a_failed_huge_allocation_is_called_that_not_a_failed_download():
    res = runner.invoke(app, ["inspect", "timm:resnet18", "--arch-kwargs", '{"num_classes": 100000000000}'])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and "needs more memory than this machine has" in lines[0], res.output
    assert "fetch" not in lines[0]


def test_a_full_disk_while_writing_the_state_file_is_an_error_line(saved, tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError ('unexpected pos' / 'file write failed'), not OSError."""
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith(".tmp") and "run.state" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 6912 vs 6800")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    res = runner.invoke(app, ["evaluate", str(saved), "--data", "mnist", "--n", "4", "--suite", "quick", "--state",
                              str(tmp_path / "run.state")])
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("batch ")]
    assert res.exit_code == 1 and len(lines) == 1 and "disk full or a file size limit?" in lines[0], res.output
    assert not list(tmp_path.glob(".run.state*"))  # no temporary left behind
