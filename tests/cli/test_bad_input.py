"""Hostile and broken inputs: one clear ``error:`` line, the right exit code, nothing left behind.

One table (``CASES``) drives the CLI in process. Each case builds its inputs in an assets folder,
runs ``surgery ...`` with a fresh working folder, and checks: the exit code (1 for bad input,
2 for usage errors), that stderr is exactly one line starting with ``error:`` that matches the
case's pattern, that no output or temporary file appeared in the working folder, and that no
marker file was written by code a file tried to run. Tests below the table cover what needs a
run first (state and checkpoint mismatches), a subprocess (file-size limit, SIGTERM), or the
Python API.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.io import archspec
from robust_surgery.cli.app import app

runner = CliRunner()
EVAL = ["--n", "8", "--no-checks", "--eps", "0.1", "--attack", "fgsm"]


def _manifest_file(assets: Path, name: str, manifest, tensors=None) -> Path:
    """A copy of the good converted MLP with its manifest replaced (a string is written as is)."""
    good = assets / "good.safetensors"
    path = assets / name
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors if tensors is not None else load_file(str(good)), str(path), metadata={"robust_surgery": text})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    plain = rs.load_model("zoo:mnist-mlp-rs")
    rs.save(rs.convert(plain, **rs.preset_for(plain)), d / "good.safetensors")
    good = rs.read_manifest(d / "good.safetensors")
    marker = d / "MARKER"
    evil_mod = d / "evil_mod_rs.py"
    evil_mod.write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        def build(**kwargs):
            Path({str(marker)!r}).write_text("called")
    """))
    sys.path.insert(0, str(d))
    _manifest_file(d, "os_system.safetensors", {**good, "arch": "os:system", "layers": {},
                                                "arch_kwargs": {"command": f"touch {marker}"}})
    _manifest_file(d, "subprocess_run.safetensors", {**good, "arch": "subprocess:run", "layers": {},
                                                     "arch_kwargs": {"args": ["touch", str(marker)]}})
    _manifest_file(d, "own_module.safetensors", {**good, "arch": "evil_mod_rs:build", "layers": {}, "arch_kwargs": None})
    _manifest_file(d, "nested.safetensors", {**good, "arch": "robust_surgery.reprogram.pipeline:build_reprogrammed",
                                             "layers": {}, "arch_kwargs": {
                                                 "source_arch": "os:system", "source_kwargs": {"command": f"touch {marker}"},
                                                 "program": {}, "mapping": {}}})
    _manifest_file(d, "bad_kwargs.safetensors", {**good, "arch": "robust_surgery.purification.synthetic:sparse_coding_mlp",
                                                 "layers": {}, "arch_kwargs": {"evil": 1}})
    _manifest_file(d, "not_object.safetensors", "[1, 2, 3]")
    _manifest_file(d, "not_json.safetensors", "{not json")
    _manifest_file(d, "layers_list.safetensors", {**good, "layers": [1, 2]})
    _manifest_file(d, "arch_int.safetensors", {**good, "arch": 5})
    _manifest_file(d, "k_string.safetensors", {**good, "layers": {k: {**v, "K": "three"} for k, v in good["layers"].items()}})
    tensors = load_file(str(d / "good.safetensors"))
    tensors["fc1.bias"] = torch.zeros(3)
    _manifest_file(d, "mismatch.safetensors", good, tensors)
    nan_model = rs.load(d / "good.safetensors")
    with torch.no_grad():
        nan_model.fc1.weight[0, 0] = float("nan")
    rs.save(nan_model, d / "nan_outputs.safetensors")
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.state").write_bytes(os.urandom(4096))
    (d / "empty.npy").write_bytes(b"")
    (d / "ckpt-random").mkdir()
    (d / "ckpt-random" / "finetune-last.pt").write_bytes(os.urandom(4096))
    (d / "a-file").write_text("x")
    torch.save({"images": torch.rand(8, 28, 28), "labels": torch.arange(8)}, d / "images_3d.pt")
    torch.save({"images": torch.rand(8, 1, 28, 28), "labels": torch.arange(8) + 5}, d / "labels_high.pt")
    torch.save({"images": torch.rand(8, 1, 28, 28), "labels": torch.rand(8)}, d / "labels_float.pt")
    x = torch.rand(8, 1, 28, 28)
    x[3, 0, 5, 5] = float("nan")
    torch.save({"images": x, "labels": torch.arange(8)}, d / "pixels_nan.pt")
    yield d
    sys.path.remove(str(d))


# (id, argv with {a} for the assets folder, exit code, pattern the error line must match)
CASES = [
    # a file never runs code
    ("manifest os:system / inspect", ["inspect", "{a}/os_system.safetensors"], 1, r"os:system.*--trust-code"),
    ("manifest os:system / evaluate", ["evaluate", "{a}/os_system.safetensors", "--data", "mnist", *EVAL], 1, r"os:system.*--trust-code"),
    ("manifest os:system / finetune", ["finetune", "{a}/os_system.safetensors", "--data", "mnist"], 1, r"os:system.*--trust-code"),
    ("manifest os:system / convert", ["convert", "{a}/os_system.safetensors"], 1, r"os:system.*--trust-code"),
    ("manifest subprocess:run", ["inspect", "{a}/subprocess_run.safetensors"], 1, r"subprocess:run.*--trust-code"),
    ("manifest names the test's module", ["inspect", "{a}/own_module.safetensors"], 1, r"evil_mod_rs:build.*--trust-code"),
    ("registered builder with a spec from the file", ["inspect", "{a}/nested.safetensors"], 1, r"os:system.*--trust-code"),
    ("registered builder, kwargs outside its signature", ["inspect", "{a}/bad_kwargs.safetensors"], 1, r"do not fit robust_surgery.purification.synthetic:sparse_coding_mlp.*evil"),
    # damaged model files
    ("manifest not an object", ["inspect", "{a}/not_object.safetensors"], 1, r"manifest's top level must be a JSON object"),
    ("manifest not JSON", ["inspect", "{a}/not_json.safetensors"], 1, r"not_json.safetensors: the manifest is not valid JSON"),
    ("manifest layers a list", ["inspect", "{a}/layers_list.safetensors"], 1, r"'layers' must be an object"),
    ("manifest arch a number", ["inspect", "{a}/arch_int.safetensors"], 1, r"'arch' must be a string"),
    ("manifest K a string", ["inspect", "{a}/k_string.safetensors"], 1, r"layer 'fc1' K must be a whole number"),
    ("tensors do not fit the manifest", ["inspect", "{a}/mismatch.safetensors"], 1, r"tensor fc1.bias has shape \(3,\).*wants \(256,\)"),
    ("random bytes as .pt", ["inspect", "{a}/random.pt", "--arch", "zoo:mnist-mlp"], 1, r"random.pt is not a PyTorch file"),
    ("random bytes as .safetensors", ["inspect", "{a}/random.safetensors"], 1, r"not a readable .safetensors file"),
    ("empty model file", ["inspect", "{a}/empty.safetensors"], 1, r"empty \(0 bytes\)"),
    ("--arch for a file with a manifest", ["inspect", "{a}/good.safetensors", "--arch", "zoo:mnist-lenet"], 1, r"records its own architecture.*Drop --arch"),
    ("a factory given as MODEL", ["convert", "foo.bar:baz"], 1, r"names a Python factory, not a model.*--arch foo.bar:baz"),
    ("converting a converted model", ["convert", "{a}/good.safetensors"], 1, r"already converted \(3 NRPM layers"),
    # data
    ("images not N x C x H x W", ["evaluate", "{a}/good.safetensors", "--data", "{a}/images_3d.pt", *EVAL], 1, r"'images' must be an N x C x H x W"),
    ("labels beyond the model's classes", ["evaluate", "{a}/good.safetensors", "--data", "{a}/labels_high.pt", *EVAL], 1, r"labels reach 12 but the model has 10 outputs"),
    ("float labels", ["evaluate", "{a}/good.safetensors", "--data", "{a}/labels_float.pt", *EVAL], 1, r"'labels' must be integer class indices"),
    ("NaN pixels", ["evaluate", "{a}/good.safetensors", "--data", "{a}/pixels_nan.pt", *EVAL], 1, r"NaN or infinite pixels"),
    ("model outputs NaN", ["evaluate", "{a}/nan_outputs.safetensors", "--data", "mnist", *EVAL], 1, r"outputs NaN or infinite logits.*none are reported"),
    ("--data-root names nothing", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--data-root", "{a}/no-such-folder", *EVAL], 1, r"data root .*no-such-folder does not exist"),
    ("unknown data set", ["evaluate", "{a}/good.safetensors", "--data", "mnits", *EVAL], 1, r"Unknown data set 'mnits'.*Did you mean 'mnist'"),
    # numbers
    ("--mean of the wrong length", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--mean", "0.5,0.5", "--std", "0.5,0.5", *EVAL], 1, r"--mean has 2 values but the images have 1 channel"),
    ("--std with a zero", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--mean", "0.5", "--std", "0", *EVAL], 1, r"--std values must be > 0"),
    ("--batch-size 0 (evaluate)", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--batch-size", "0", *EVAL], 1, r"batch_size \(--batch-size\) must be a whole number >= 1"),
    ("--batch-size 0 (finetune)", ["finetune", "{a}/good.safetensors", "--data", "mnist", "--batch-size", "0"], 1, r"batch_size \(--batch-size\) must be a whole number >= 1"),
    ("--steps 0", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--steps", "0", *EVAL], 1, r"steps \(--steps\) must be a whole number >= 1"),
    ("--restarts 0", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--restarts", "0", *EVAL], 1, r"restarts \(--restarts\) must be"),
    ("--eps nan", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--n", "8", "--eps", "nan"], 1, r"eps must be finite budgets, got nan"),
    ("--eps inf", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--n", "8", "--eps", "inf"], 1, r"eps must be finite budgets, got inf"),
    ("--eps negative", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--n", "8", "--eps", "-0.1"], 1, r"eps must be >= 0"),
    ("--attack empty", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--n", "8", "--attack", ""], 1, r"no attack given"),
    ("--attack unknown", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--n", "8", "--attack", "fgsm,pdg"], 1, r"unknown attack 'pdg'"),
    ("--train-eps nan", ["convert", "zoo:mnist-mlp-rs", "--paradigm", "2", "--data", "mnist", "--train-eps", "nan"], 1, r"eps \(--train-eps\) must be a finite number, got nan"),
    ("--lr nan", ["finetune", "{a}/good.safetensors", "--data", "mnist", "--lr", "nan"], 1, r"lr \(--lr\) must be a finite number"),
    ("--input-shape that does not fit", ["convert", "zoo:mnist-mlp-rs", "--input-shape", "3,32,32"], 1, r"cannot run on one input of shape \(3, 32, 32\)"),
    ("--input-shape not numbers", ["convert", "zoo:mnist-mlp-rs", "--input-shape", "a,b"], 1, r"--input-shape must be numbers"),
    ("--override names nothing", ["convert", "zoo:mnist-mlp-rs", "--override", '{"fc9": {"lam": 1}}'], 1, r"override 'fc9' names no convertible layer"),
    ("--override not JSON", ["convert", "zoo:mnist-mlp-rs", "--override", "{fc1: 1}"], 2, r"--override must be JSON"),
    ("--recalibrate-bn without --data", ["convert", "zoo:cifar-resnet20", "--recalibrate-bn", "5"], 2, r"--recalibrate-bn N runs N clean training batches: give them with --data"),
    ("--exclude everything", ["convert", "zoo:mnist-mlp-rs", "--exclude", "fc*"], 1, r"no layer was selected with exclude=\['fc\*'\]"),
    # paths
    ("-o is a folder", ["convert", "zoo:mnist-mlp-rs", "-o", "{a}"], 1, r"must be a file ending in .safetensors"),
    ("-o a folder named .safetensors", ["convert", "zoo:mnist-mlp-rs", "-o", "{a}/dir.safetensors"], 1, r"is a folder"),
    ("-o in a missing folder", ["convert", "zoo:mnist-mlp-rs", "-o", "nope/m.safetensors"], 1, r"folder nope does not exist"),
    ("--json is a FIFO", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--json", "{a}/fifo", *EVAL], 1, r"is not a regular file"),
    ("--json is a folder", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--json", "{a}", *EVAL], 1, r"is a folder"),
    ("--plot in a missing folder", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--plot", "nope/c.png", *EVAL], 1, r"folder nope does not exist"),
    ("--state is a folder", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--state", "{a}", *EVAL], 1, r"state file \(--state\) .* is a folder"),
    ("--state random bytes", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--state", "{a}/random.state", *EVAL], 1, r"random.state is not a file robust-surgery wrote"),
    ("--checkpoint-dir is a file", ["finetune", "{a}/good.safetensors", "--data", "mnist", "--checkpoint-dir", "{a}/a-file"], 1, r"--checkpoint-dir\) .*a-file is a file"),
    ("checkpoint random bytes", ["finetune", "{a}/good.safetensors", "--data", "mnist", "--n-train", "64", "--val-n", "32", "--checkpoint-dir", "{a}/ckpt-random"], 1, r"finetune-last.pt is not a file robust-surgery wrote"),
    ("empty basis file", ["purification", "zoo:mnist-lenet", "--data", "mnist", "--layer", "conv1", "--basis", "{a}/empty.npy", "--n", "50"], 1, r"basis file .*empty.npy is empty"),
    # usage errors
    ("unknown option", ["evaluate", "{a}/good.safetensors", "--data", "mnist", "--bogus"], 2, r"No such option: --bogus.*surgery evaluate --help"),
    ("missing argument", ["evaluate"], 2, r"Missing argument 'MODEL'|Missing argument 'model'"),
    ("option value not a number", ["convert", "zoo:mnist-mlp-rs", "--K", "abc"], 2, r"Invalid value for '--K'"),
]


@pytest.mark.parametrize("argv,code,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_line(assets, tmp_path, monkeypatch, argv, code, pattern):
    if not (assets / "fifo").exists():
        os.mkfifo(assets / "fifo")
    (assets / "dir.safetensors").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    before_assets = sorted(p.name for p in assets.iterdir())
    res = runner.invoke(app, [a.replace("{a}", str(assets)) for a in argv])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == code, (res.exit_code, res.stderr, res.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == [], "an output or temporary file was left behind"
    assert sorted(p.name for p in assets.iterdir()) == before_assets, "a file appeared or vanished in the inputs"
    assert not (assets / "MARKER").exists(), "code named by a file ran"
    assert (assets / "fifo").is_fifo()


def test_python_load_refuses_code_from_files(assets):
    for name in ("os_system", "subprocess_run", "own_module", "nested"):
        with pytest.raises(rs.UntrustedCodeError, match="trust_code=True"):
            rs.load(assets / f"{name}.safetensors")
    assert not (assets / "MARKER").exists()
    assert "evil_mod_rs" not in sys.modules  # refused before importing anything


def test_trust_code_is_the_users_consent(tmp_path):
    """With trust_code=True (or the same factory given as --arch) a file's own factory is called."""
    mod = tmp_path / "own_arch_rs.py"
    mod.write_text("import torch\ndef build(width=4):\n    return torch.nn.Sequential(torch.nn.Linear(3, width))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        model = rs.build_arch("own_arch_rs:build", kwargs={"width": 5})  # the user's own call: allowed
        rs.save(rs.convert(model, lam=0.5, K=1), tmp_path / "own.safetensors")
        with pytest.raises(rs.UntrustedCodeError, match=r"own_arch_rs:build\(\*\*\{'width': 5\}\)"):
            rs.load(tmp_path / "own.safetensors")
        back = rs.load(tmp_path / "own.safetensors", trust_code=True)
        assert back[0].weight.shape == (5, 3)
        same = rs.load(tmp_path / "own.safetensors", arch="own_arch_rs:build")  # the user named it
        assert torch.equal(same[0].weight, back[0].weight)
        rs.register_builder("own_arch_rs:build", sys.modules["own_arch_rs"].build)  # consent given in code
        assert rs.load(tmp_path / "own.safetensors")[0].weight.shape == (5, 3)
    finally:
        archspec.BUILDERS.pop("own_arch_rs:build", None)
        sys.path.remove(str(tmp_path))


def test_r2dl_file_source_spec_resolves_through_registries(tmp_path):
    from robust_surgery.reprogram.r2dl import FORMAT, load_r2dl

    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.r2dl.safetensors"
    manifest = {"format": FORMAT, "source_spec": "os:system", "config": {"random_encoder": False, "seed": 0,
                "dense": True, "k": 1}, "task": {"alphabet": "AC"}, "cls_id": 0, "sep_id": 1, "mapping": {}}
    save_file({"theta": torch.zeros(3, 4)}, str(path), metadata={"robust_surgery": json.dumps(manifest)})
    with pytest.raises(rs.ModelLoadError, match="names a Python factory, not a model"):
        load_r2dl(path)
    assert not marker.exists()


def _converted_mlp(norm="L1"):
    plain = rs.load_model("zoo:mnist-mlp-rs")
    return rs.convert(plain, norm=norm, K=1, eps=5e-5, lam=0.6)


def test_evaluation_state_binds_every_setting(tmp_path):
    state = tmp_path / "run.state"
    model = _converted_mlp()
    common = dict(attacks=["pgd"], eps=[0.1], n=16, batch_size=8, steps=2, checks=False, state=state)
    first = rs.evaluate(model, "mnist", **common)
    again = rs.evaluate(model, "mnist", **common)  # same settings: resumes (nothing left to do), same numbers
    assert again.to_dict()["robust_acc"] == first.to_dict()["robust_acc"]
    for change, field in ((dict(threat="L2"), "threat model is Linf, this run's is L2"),
                          (dict(alpha=1e-7), r"alpha is null, this run's is 1e-07"),
                          (dict(restarts=2), r"attacks\[nrpm/direct:pgd-s2@0.1\].restarts is 1, this run's is 2"),
                          (dict(mean=[0.5], std=[0.25]), "mean is null"),
                          (dict(seed=1), "seed is 0, this run's is 1")):
        with pytest.raises(rs.StateMismatchError, match=field):
            rs.evaluate(model, "mnist", **{**common, **change})
    with pytest.raises(rs.StateMismatchError, match=r"NRPM settings.fc1.norm is L1, this run's is L2"):
        rs.evaluate(_converted_mlp("L2"), "mnist", **common)
    other_data = (torch.rand(16, 1, 28, 28), torch.arange(16) % 10)
    with pytest.raises(rs.StateMismatchError, match=r"its data is"):
        rs.evaluate(model, other_data, **{k: v for k, v in common.items() if k != "n"})


def test_finetune_checkpoint_binds_the_starting_model_and_settings(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = dict(adversarial="fgsm", eps=0.1, epochs=2, n_train=64, val_n=32, batch_size=32, checkpoint_dir=ckpt,
                  max_epochs_this_run=1)
    rs.finetune(_converted_mlp(), "mnist", 2, **common)
    assert (ckpt / "finetune-last.pt").exists()
    with pytest.raises(rs.StateMismatchError, match=r"starting model.layers.fc1.norm is L1, this run's is L2"):
        rs.finetune(_converted_mlp("L2"), "mnist", 2, **common)
    with pytest.raises(rs.StateMismatchError, match=r"settings.lr is 0.001, this run's is 0.002"):
        rs.finetune(_converted_mlp(), "mnist", 2, **{**common, "lr": 2e-3})
    with pytest.raises(rs.StateMismatchError, match=r"training data is"):
        rs.finetune(_converted_mlp(), "mnist", 2, **{**common, "n_train": 48})
    model, history = rs.finetune(_converted_mlp(), "mnist", 2, **{**common, "max_epochs_this_run": None})
    assert [h["epoch"] for h in history] == [1, 2]  # the matching run resumed at epoch 2


def test_python_api_wrong_types_say_what_was_expected():
    model = _converted_mlp()
    with pytest.raises(TypeError, match=r"convert takes an nn.Module, got a str; load it first"):
        rs.convert("zoo:mnist-mlp")
    with pytest.raises(TypeError, match="include takes layer names or patterns"):
        rs.convert(rs.load_model("zoo:mnist-mlp-rs"), include=5)
    with pytest.raises(TypeError, match=r"attacks takes a list of attack names"):
        rs.evaluate(model, "mnist", attacks="fgsm", n=8)
    with pytest.raises(TypeError, match=r"eps takes a list of budgets"):
        rs.evaluate(model, "mnist", eps=0.1, n=8)
    with pytest.raises(TypeError, match="load_model takes a file path or a spec string"):
        rs.load_model(model)


def test_json_output_is_strict(tmp_path):
    from robust_surgery._json import strict_dumps

    text = strict_dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.tensor([1.0, float("-inf")])})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [1.0, None]}
    assert "NaN" not in text and "Infinity" not in text


def _python(code: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_file_size_limit_is_a_clear_error_and_leaves_nothing(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # bytes; the model file is ~870 kB

    code = """
        import sys
        from typer.testing import CliRunner
        from robust_surgery.cli.app import app
        res = CliRunner().invoke(app, ["convert", "zoo:mnist-mlp-rs", "-o", "m.safetensors"])
        sys.stderr.write(res.stderr)
        sys.exit(res.exit_code)
    """
    p = _python(code, tmp_path, preexec_fn=limit)
    out, errtext = p.communicate(timeout=300)
    lines = [line for line in errtext.splitlines() if line.startswith("error:")]
    assert p.returncode == 1, errtext
    assert len(lines) == 1 and "file size limit" in lines[0], errtext
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_save_leaves_no_temporary_file(tmp_path):
    code = """
        import torch, robust_surgery as rs
        model = torch.nn.Sequential(torch.nn.Linear(6000, 6000), torch.nn.Linear(6000, 6000))  # ~290 MB
        print("ready", flush=True)
        for i in range(50):
            rs.save(model, "big.safetensors")
            __import__("os").remove("big.safetensors")
    """
    p = _python(code, tmp_path)
    assert p.stdout.readline().strip() == "ready"
    def early_in_a_write() -> bool:  # a temporary file exists and most of its ~290 MB is still to come
        for f in tmp_path.iterdir():
            try:
                if f.name.endswith(".tmp") and f.stat().st_size < 100 << 20:
                    return True
            except FileNotFoundError:
                pass
        return False

    deadline = time.time() + 120
    while time.time() < deadline and not early_in_a_write():
        time.sleep(0.002)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert [f.name for f in tmp_path.iterdir() if f.name != "big.safetensors"] == []  # no temporary file of any kind


def test_disk_full_is_a_clear_error_and_keeps_the_old_file(tmp_path):
    import errno

    from robust_surgery._files import atomic_path

    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(rs.OutputPathError, match="report.json: the disk is full; nothing was written"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_diverging_training_stops_and_saves_nothing(tmp_path):
    x, y = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    with pytest.raises(rs.NonFiniteError, match="training diverged.*Lower --lr"):
        rs.finetune(_converted_mlp(), (x, y), 3, adversarial=None, lr=1e30, epochs=1, val_n=16, batch_size=16,
                    checkpoint_dir=tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "finetune-last.pt").exists()


def test_every_library_error_class_is_a_user_error():
    """The CLI's one-line errors are exactly the UserError family (plus OS errors on user paths)."""
    from robust_surgery import errors
    from robust_surgery.data.datasets import DataFormatError, DataNotFoundError
    from robust_surgery.model_zoo.minilm import MiniLMNotInstalledError
    from robust_surgery.reprogram.query import QueryBudgetExceeded
    from robust_surgery.surgery.convert import NoLayerMatchedError
    from robust_surgery.io.zoo import ChecksumError, ZooError

    classes = [getattr(errors, n) for n in errors.__all__] + [
        DataFormatError, DataNotFoundError, MiniLMNotInstalledError, QueryBudgetExceeded, NoLayerMatchedError,
        ChecksumError, ZooError]
    assert all(issubclass(c, errors.UserError) for c in classes)
    # and each keeps the built-in that code written against plain Python catches
    assert issubclass(ZooError, ValueError) and issubclass(DataNotFoundError, FileNotFoundError)
    assert issubclass(errors.InvalidTypeError, TypeError)
    with pytest.raises(ValueError, match="must be in"):
        rs.set_lam(rs.convert(torch.nn.Sequential(torch.nn.Linear(2, 2))), 1.5)


def test_a_bug_shows_its_traceback_and_a_user_error_one_line(monkeypatch):
    """A UserError is one `error:` line; any other exception is a bug and is not hidden."""
    def bug(*a, **k):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(rs, "inspect_model", bug)
    res = runner.invoke(app, ["inspect", "zoo:mnist-mlp-rs"])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError) and "error:" not in res.output

    def user_error(*a, **k):
        raise rs.errors.InvalidInputError("the input is wrong; do this instead")

    monkeypatch.setattr(rs, "inspect_model", user_error)
    res = runner.invoke(app, ["inspect", "zoo:mnist-mlp-rs"])
    assert res.exit_code == 1 and not isinstance(res.exception, rs.errors.UserError)
    assert res.output.strip().splitlines() == ["error: the input is wrong; do this instead"]


def test_without_torchattacks_an_attack_command_says_how_to_install_it(tmp_path):
    """torchattacks is installed with --no-deps (docs/safety.md); when it is missing, one error line says how."""
    code = """
        import sys
        sys.modules["torchattacks"] = None  # as if it were not installed
        from typer.testing import CliRunner
        from robust_surgery.cli.app import app
        res = CliRunner().invoke(app, ["evaluate", "zoo:mnist-mlp", "--data", "mnist", "--n", "10", "--attack", "fgsm",
                                       "--eps", "0.1"])
        sys.stderr.write(res.stderr)
        sys.exit(res.exit_code)
    """
    p = _python(code, tmp_path)
    out, errtext = p.communicate(timeout=300)
    lines = [line for line in errtext.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and "Traceback" not in errtext, errtext
    assert len(lines) == 1 and 'pip install --no-deps "torchattacks==3.5.1"' in lines[0], errtext
