"""Progress when stderr is not a terminal: plain lines (step, total, rate, time left), not silence."""
from __future__ import annotations

import io
import json

from typer.testing import CliRunner

from robust_surgery._loops import PlainProgress
from robust_surgery.cli.app import app


def test_plain_progress_prints_every_interval_and_once_at_the_end():
    out = io.StringIO()
    bar = PlainProgress(interval=0.0, stream=out)
    task = bar.add_task("R2DL epoch 1/2", total=4, loss=float("nan"))
    for step in range(4):
        bar.update(task, advance=1, loss=0.5 - 0.1 * step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("R2DL epoch 1/2: 1/4 (25 %), ") and "left, loss 0.5000" in lines[0]
    assert lines[-1].startswith("R2DL epoch 1/2: 4/4 (100 %), ") and "taken, loss 0.2000" in lines[-1]
    quiet = io.StringIO()
    bar = PlainProgress(interval=3600.0, stream=quiet)
    task = bar.add_task("evaluating", total=3)
    for _ in range(3):
        bar.advance(task)
    assert quiet.getvalue().count("\n") == 1 and quiet.getvalue().startswith("evaluating: 3/3 (100 %)")


def test_a_training_command_with_stderr_in_a_log_prints_progress_lines(tmp_path):
    res = CliRunner().invoke(app, ["zoo", "train", "mnist-mlp", "--epochs", "1", "--n-train", "1000",
                                   "-o", str(tmp_path / "m.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    assert "mnist-mlp epoch 1/1: 8/8 (100 %)" in res.stderr
    json.loads(res.stdout)  # results stay alone on stdout
