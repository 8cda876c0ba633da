"""Issue 31: no command overwrites its own input, or one of its outputs with another: refused with one
`error:` line, exit 1, before any work, every file unchanged (links and ./ spellings included)."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app

runner = CliRunner()


@pytest.fixture()
def model_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rs.save(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), lam=0.6, K=1), tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


def _refused(args, files, match):
    before = {f: (f.read_bytes() if f.exists() else None) for f in files}
    res = runner.invoke(app, args)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.output
    assert "Traceback" not in res.output
    assert {f: (f.read_bytes() if f.exists() else None) for f in files} == before


def test_a_report_cannot_replace_the_model(model_file):
    _refused(["evaluate", "m.safetensors", "--data", "mnist", "--n", "5", "--json", "m.safetensors"], [model_file],
             "the report (--json) m.safetensors is the same file as the model (MODEL)")
    _refused(["evaluate", "m.safetensors", "--data", "mnist", "--n", "5", "--json", "./sub/../m.safetensors"],
             [model_file], "is the same file as the model")


def test_links_to_the_input_count(model_file, tmp_path):
    os.symlink(model_file, tmp_path / "link.safetensors")
    os.link(model_file, tmp_path / "hard.safetensors")
    for name in ("link.safetensors", "hard.safetensors"):
        _refused(["evaluate", "m.safetensors", "--data", "mnist", "--n", "5", "--plot", name], [model_file],
                 f"the plot (--plot) {name} is the same file as the model (MODEL)")


def test_a_log_or_state_cannot_replace_the_model_and_two_outputs_cannot_share_a_file(model_file, tmp_path):
    _refused(["finetune", "m.safetensors", "--paradigm", "3", "--data", "mnist", "--log", "m.safetensors", "-o",
              "out.safetensors"], [model_file, tmp_path / "out.safetensors"], "the log (--log) m.safetensors is the same file")
    _refused(["evaluate", "m.safetensors", "--data", "mnist", "--n", "5", "--state", "m.safetensors"], [model_file],
             "the state file (--state) m.safetensors is the same file as the model")
    _refused(["evaluate", "m.safetensors", "--data", "mnist", "--n", "5", "--json", "r.png", "--plot", "r.png"],
             [model_file, tmp_path / "r.png"], "the plot (--plot) r.png is the same file as the report (--json)")
    _refused(["convert", "m.safetensors", "-o", "m.safetensors"], [model_file],
             "the output (-o) m.safetensors is the same file as the model (MODEL)")
