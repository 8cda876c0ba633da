"""Training under torchrun: 2 gloo processes give the 1-process model; a run stopped and resumed under
torchrun ends where an uninterrupted one does."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, shared_data, script=None):
    env = {**os.environ, "ROBUST_SURGERY_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "robust_surgery.cli.app"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *target, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _compare(a, b, tol=1e-6, points=0.0):
    """Parameters within ``tol``, the same kept epoch, validation accuracies within ``points``."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    assert worst <= tol, worst
    ma, mb = rs.read_manifest(a)["training"], rs.read_manifest(b)["training"]
    assert ma["kept_epoch"] == mb["kept_epoch"]
    for ra, rb in zip(ma["history"], mb["history"], strict=True):
        for key in ("val_clean_acc", "val_robust_acc"):
            assert abs(ra.get(key, 0) - rb.get(key, 0)) <= points, (key, ra, rb)
    return ma


# Clean batches: equal to rounding. FGSM batches: sign(∇x) turns a rounding-level difference of the
# weights into an ε-sized change of a near-zero-gradient pixel, so the runs drift apart a little
# (measured: 1.8e-4 in the parameters after 8 steps); same kept epoch, validation within 1 point.
@pytest.mark.parametrize("zoo,adv,tol,points", [("mnist-mlp-rs", "none", 1e-6, 0.0), ("mnist-mlp-rs", "fgsm", 2e-3, 1.0)])
def test_two_gloo_processes_train_the_single_process_model(tmp_path, shared_data, zoo, adv, tol, points):
    start = tmp_path / "start.safetensors"
    rs.save(rs.convert(rs.load_model(f"zoo:{zoo}"), paradigm=1, norm="L1", K=1, lam=0.7), start)
    # 100 validation points: rank 1 validates nothing (one chunk of 500); 200 training points in
    # batches of 64: the last batch (8) splits 4 + 4, every batch splits evenly
    args = ["finetune", str(start), "--paradigm", "3", "--data", "mnist", "--n-train", "200", "--val-n", "100",
            "--epochs", "2", "--batch-size", "64", "--adversarial", adv, "--train-eps", "0.1", "--lr", "0.01",
            "--seed", "3"]
    _torchrun([*args, "--log-file", str(tmp_path / "dist.json"), "-o", str(tmp_path / "dist.safetensors")], shared_data)
    one = runner.invoke(app, [*args, "-o", str(tmp_path / "one.safetensors")])
    assert one.exit_code == 0, one.output
    training = _compare(tmp_path / "dist.safetensors", tmp_path / "one.safetensors", tol, points)
    assert len(json.loads((tmp_path / "dist.json").read_text())) == 2 == len(training["history"])


def test_a_run_stopped_after_epoch_1_and_resumed_under_torchrun_equals_an_uninterrupted_one(tmp_path, shared_data):
    start = tmp_path / "start.safetensors"
    rs.save(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), paradigm=1, norm="L1", K=1, lam=0.7), start)
    args = ["finetune", str(start), "--paradigm", "2", "--data", "mnist", "--n-train", "192", "--val-n", "100",
            "--epochs", "2", "--batch-size", "64", "--adversarial", "fgsm", "--train-eps", "0.1", "--lr", "0.05",
            "--seed", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "resumed.safetensors")]
    first = runner.invoke(app, [*args, "--max-epochs-this-run", "1"])  # one process, stops after epoch 1
    assert first.exit_code == 0 and "stopped after epoch 1 of 2" in first.stderr
    assert not (tmp_path / "resumed.safetensors").exists()
    _torchrun(args, shared_data)  # two processes finish it from the checkpoint
    whole = [a if a != str(tmp_path / "ckpt") else str(tmp_path / "ckpt2") for a in args]
    whole[-1] = str(tmp_path / "whole.safetensors")
    assert runner.invoke(app, whole).exit_code == 0
    _compare(tmp_path / "resumed.safetensors", tmp_path / "whole.safetensors", 2e-3, 1.0)  # FGSM batches
    assert torch.load(tmp_path / "ckpt" / "finetune-last.pt", weights_only=True)["epoch"] == 2


LENET_DRIVER = """
import sys, torch
import robust_surgery as rs
from robust_surgery._dist import is_main
net = rs.load_model("zoo:mnist-lenet-rs")
net.conv2_drop.p = net.dropout.p = 0.0  # dropout draws its masks per rank (as under DDP): off for equality
net = rs.convert(net, paradigm=1, norm="L1", K=1, lam=0.7)
net, history = rs.finetune(net, "mnist", paradigm=3, adversarial=None, epochs=2, batch_size=50, n_train=150,
                           val_n=100, lr=0.01, seed=2)
if is_main():
    torch.save({"state": net.state_dict(), "history": history}, sys.argv[1])
"""


def test_two_gloo_processes_fine_tune_lenet_like_one(tmp_path, shared_data):
    """Python API under torchrun: a converted LeNet (conv, max-pool; dropout off), batches of 50 split 25 + 25."""
    script = tmp_path / "driver.py"
    script.write_text(LENET_DRIVER)
    _torchrun([str(tmp_path / "dist.pt")], shared_data, script)
    env = {**os.environ, "ROBUST_SURGERY_DATA": str(shared_data)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist, one = torch.load(tmp_path / "dist.pt", weights_only=True), torch.load(tmp_path / "one.pt", weights_only=True)
    worst = max(float((dist["state"][k].double() - one["state"][k].double()).abs().max()) for k in one["state"])
    assert worst <= 1e-6, worst
    assert [r["val_clean_acc"] for r in dist["history"]] == [r["val_clean_acc"] for r in one["history"]]
    assert all(abs(a["train_loss"] - b["train_loss"]) <= 1e-6 for a, b in zip(dist["history"], one["history"]))


def test_two_nodes_through_torchruns_rendezvous_train_the_single_process_model(tmp_path, shared_data):
    """docs/cli.md's two-machine example, both 'machines' on localhost: c10d rendezvous, one process each."""
    start = tmp_path / "start.safetensors"
    rs.save(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), paradigm=1, norm="L1", K=1, lam=0.7), start)
    args = ["finetune", str(start), "--paradigm", "3", "--data", "mnist", "--n-train", "200", "--val-n", "100",
            "--epochs", "1", "--batch-size", "64", "--adversarial", "none", "--lr", "0.01"]
    env = {**os.environ, "ROBUST_SURGERY_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "-m", "robust_surgery.cli.app", *args, "-o", str(tmp_path / "multi.safetensors")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one = runner.invoke(app, [*args, "-o", str(tmp_path / "one.safetensors")])
    assert one.exit_code == 0, one.output
    _compare(tmp_path / "multi.safetensors", tmp_path / "one.safetensors")


BN_DRIVER = """
import sys, torch
import robust_surgery as rs
from robust_surgery._dist import is_main
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(4 * 26 * 26, 10))
net = rs.convert(net, paradigm=1, norm="L1", K=1, lam=0.8)
net, history = rs.finetune(net, "mnist", paradigm=3, adversarial=None, epochs=1, batch_size=32, n_train=96,
                           val_n=50, lr=0.05, seed=4, sync_bn=sys.argv[2] == "sync")
if is_main():
    assert type(net[1]) is torch.nn.BatchNorm2d  # the model keeps its own classes
    torch.save(net.state_dict(), sys.argv[1])
"""


def test_sync_bn_on_cpu_is_a_clear_error_and_without_it_ranks_normalise_by_their_share(tmp_path, shared_data):
    """Paradigm 3 with BatchNorm under 2 gloo processes: torch's SyncBatchNorm runs on GPUs only, so
    sync_bn on CPU stops with one clear error; without it each rank normalises by its own half-batch,
    and the model differs from one process (the GPU check is where --sync-bn is measured)."""
    script = tmp_path / "driver.py"
    script.write_text(BN_DRIVER)
    env = {**os.environ, "ROBUST_SURGERY_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(tmp_path / "sync.pt"), "sync"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "sync_bn (--sync-bn) needs CUDA" in proc.stderr
    _torchrun([str(tmp_path / "local.pt"), "local"], shared_data, script)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), "local"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, local = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "local.pt", weights_only=True)
    assert max(float((local[k].double() - one[k].double()).abs().max()) for k in one if one[k].is_floating_point()) > 1e-4


def test_pretrain_under_torchrun_equals_one_process(tmp_path, shared_data):
    """surgery pretrain goes through the same loop: 2 processes, clean batches, the 1-process model."""
    args = ["pretrain", "zoo:mnist-mlp-rs", "--data", "mnist", "--n-train", "200", "--epochs", "2",
            "--batch-size", "64", "--lr", "0.001"]
    _torchrun([*args, "-o", str(tmp_path / "dist.safetensors")], shared_data)
    one = runner.invoke(app, [*args, "-o", str(tmp_path / "one.safetensors")])
    assert one.exit_code == 0, one.output
    ta, tb = load_file(str(tmp_path / "dist.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta) <= 1e-6
    ha, hb = (rs.read_manifest(tmp_path / f)["training"]["history"] for f in ("dist.safetensors", "one.safetensors"))
    assert [round(r["train_loss"], 6) for r in ha] == [round(r["train_loss"], 6) for r in hb]


def test_reprogram_ar_under_torchrun_equals_one_process(tmp_path, shared_data):
    """surgery reprogram ar goes through the same loop: 2 processes train the 1-process program, to
    Adam's tolerance: its per-entry step m/√v turns rounding-level differences of near-zero gradients
    into steps of size lr (measured 2.9e-4 at lr 0.05; 1e-7 at lr 1e-5)."""
    args = ["reprogram", "ar", "zoo:cifar-resnet20", "--target", "mnist", "--n-train", "64", "--n-test", "32",
            "--epochs", "2", "--batch-size", "32", "--decay-every", "1"]
    _torchrun([*args, "-o", str(tmp_path / "dist.safetensors")], shared_data)
    one = runner.invoke(app, [*args, "-o", str(tmp_path / "one.safetensors")])
    assert one.exit_code == 0, one.output
    ta, tb = load_file(str(tmp_path / "dist.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert ta.keys() == tb.keys()
    assert max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta) <= 2e-3
