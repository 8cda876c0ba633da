"""The `surgery` CLI end to end (Typer's runner, in process)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_convert_zoo_model_and_load_it_back(tmp_path):
    out = tmp_path / "m.safetensors"
    res = run("convert", "zoo:mnist-mlp", "--paradigm", "1", "-o", out)
    assert res.exit_code == 0, res.output
    assert "NRPM conversion" in res.stdout and "saved" in res.stdout
    model = rs.load(out)
    plain = rs.load_model("zoo:mnist-mlp")
    reference = rs.convert(plain, paradigm=1, **rs.preset_for(plain))  # the CLI follows the zoo preset
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_convert_json_output_and_settings(tmp_path):
    out = tmp_path / "lenet.safetensors"
    res = run("convert", "zoo:mnist-lenet-rs", "--norm", "MCP", "--K", "1", "--lam", "0.7", "--include", "conv*",
              "--override", '{"conv2": {"K": 2}}', "-o", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["output"] == str(out)
    assert set(data["manifest"]["layers"]) == {"conv1", "conv2"}
    assert data["manifest"]["layers"]["conv2"]["K"] == 2 and data["manifest"]["layers"]["conv1"]["norm"] == "MCP"
    rows = {r["name"]: r for r in data["report"]["layers"]}
    assert rows["conv1"]["out_elements"] == 10 * 24 * 24  # input shape known from the zoo entry


def test_paradigm_2_needs_training_data(tmp_path):
    res = run("convert", "zoo:mnist-mlp-rs", "--paradigm", "2", "-o", tmp_path / "p2.safetensors")
    assert res.exit_code == 2
    assert "--data" in res.stderr and "--paradigm 1" in res.stderr
    assert not (tmp_path / "p2.safetensors").exists()


def test_errors_are_one_clear_line_without_traceback(tmp_path):
    res = run("convert", tmp_path / "nope.pt")
    assert res.exit_code == 1 and "error:" in res.stderr and "Traceback" not in res.output
    weights = tmp_path / "w.pt"
    torch.save(rs.load_model("zoo:mnist-mlp-rs").state_dict(), weights)
    res = run("convert", weights, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "--arch" in res.stderr
    res = run("convert", "zoo:mnist-mlp-rs", "--include", "nothing", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "no layer was selected with include=['nothing']" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()
    res = run("convert", "zoo:mnist-mlp-rs", "--lam", "3", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "[0, 1]" in res.stderr


def test_convert_state_dict_with_arch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output goes to the working directory
    weights = tmp_path / "w.pt"
    torch.save(rs.load_model("zoo:mnist-mlp-rs").state_dict(), weights)
    res = run("convert", weights, "--arch", "zoo:mnist-mlp-rs", "--lam", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["output"] == "w.nrpm.safetensors"
    assert (tmp_path / "w.nrpm.safetensors").exists()


def test_inspect_plain_and_converted(tmp_path):
    res = run("inspect", "zoo:cifar-resnet20", "--K", "1", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["totals"]["layers"] == 20  # 19 convs + the final linear
    assert data["totals"]["cost_ratio"] > 1
    out = tmp_path / "c.safetensors"
    assert run("convert", "zoo:mnist-mlp-rs", "-o", out).exit_code == 0
    res = run("inspect", out)
    assert res.exit_code == 0 and "NRPM conversion" in res.stdout


def test_inspect_token_model_probes_with_token_ids():
    """The text model takes int64 token ids: inspect probes it with its example_input, not float pixels."""
    res = run("inspect", "zoo:minilm-sentiment", "--K", "1", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["totals"]["layers"] == 37  # 6 blocks × 6 Linear + the head
    query = data["layers"][0]
    assert query["name"] == "bert.encoder.layer.0.attention.self.query"
    assert query["linear_flops"] == 2 * 128 * 384 * 384  # 128 tokens × a 384→384 matmul


def test_zoo_list(tmp_path):
    res = run("zoo", "list", "--json")
    names = {e["name"] for e in json.loads(res.stdout)}
    assert {"mnist-mlp", "mnist-lenet", "cifar-resnet20", "cifar-tiny-resnet18", "mnist-mlp-rs"} <= names
    assert "cifar-resnet20" in run("zoo", "list").stdout


def test_zoo_train_quick(tmp_path):
    out = tmp_path / "t.safetensors"
    res = run("zoo", "train", "mnist-mlp", "--epochs", "1", "--n-train", "3000", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["test_acc"] > 80.0  # a linear MLP on 3000 images, one epoch
    model = rs.load(out)
    assert rs.read_manifest(out)["training"]["n_train"] == 3000
    assert isinstance(model.fc1, torch.nn.Linear)


@pytest.mark.parametrize("cmd", [["convert"], ["inspect"], ["evaluate"], ["finetune"], ["zoo", "list"], ["zoo", "train"],
                                 ["purification"], ["pretrain"], ["inherit"], ["reprogram", "ar"], ["reprogram", "bar"],
                                 ["reprogram", "r2dl"]])
def test_every_command_help_has_an_example(cmd):
    res = run(*cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout


def test_shared_finetuning_options_carry_the_librarys_defaults():
    """convert and finetune share one declaration of each fine-tuning option; its default is FinetuneConfig's."""
    import dataclasses
    import inspect

    from robust_surgery.cli import app as cli_app
    from robust_surgery.cli import options
    from robust_surgery.training.finetune import FinetuneConfig

    lib = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    conv = inspect.signature(cli_app.convert).parameters
    fine = inspect.signature(cli_app.finetune).parameters
    for name in ("adversarial", "epochs", "lr", "optimizer", "schedule", "batch_size", "seed", "n_train", "val_n",
                 "keep", "adv_weight"):
        assert conv[name].default is fine[name].default is getattr(options, name.upper())
        assert conv[name].default.default == lib[name], name


def test_zoo_train_takes_device_and_amp(tmp_path):
    """bf16 autocast training of the MLP recipe: recorded in the metrics, accuracy near float32's
    (same seed and data; stated tolerance 3 points)."""
    accs = {}
    for amp in ("none", "bf16"):
        res = run("zoo", "train", "mnist-mlp", "--epochs", "1", "--n-train", "3000", "--device", "cpu", "--amp", amp,
                  "-o", tmp_path / f"{amp}.safetensors", "--json")
        assert res.exit_code == 0, res.output
        metrics = json.loads(res.stdout)
        assert metrics["device"] == "cpu" and metrics["amp"] == (None if amp == "none" else amp)
        accs[amp] = metrics["test_acc"]
    assert accs["bf16"] > 80.0 and abs(accs["bf16"] - accs["none"]) <= 3.0, accs
    res = run("zoo", "train", "mnist-mlp", "--amp", "fp8", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "--amp must be one of none, bf16, fp16" in res.stderr
