"""Robustness evaluation: equality with a hand-written loop, guards, checks, sharding, resuming."""
from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.data.datasets import load_mnist
from nrpm_reference import EPS, fgsm_accuracies

runner = CliRunner()


@pytest.fixture(scope="module")
def mnist(shared_data):
    return load_mnist("test", shared_data)


@pytest.fixture(scope="module")
def small_nrpm():
    """Our embedded MLP converted with cheap settings: fast enough for many attacks."""
    return rs.convert(rs.load_model("zoo:mnist-mlp-rs"), norm="L1", K=1, eps=5e-5, lam=0.6)


def test_cli_fgsm_sweep_equals_a_hand_written_loop(mnist, tmp_path):
    """Issue 3's acceptance: `surgery evaluate` prints what a plain FGSM loop gives."""
    res = runner.invoke(app, ["evaluate", "zoo:mnist-mlp", "--data", "mnist", "--attack", "fgsm", "--eps",
                              ",".join(map(str, EPS)), "--n", "1000", "--json", "-"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    by_eps = {r["eps"]: r["robust_acc"] for r in report["results"] if r["attack"] == "fgsm"}
    model = rs.load_model("zoo:mnist-mlp")
    want = fgsm_accuracies(model, mnist[0][:1000], mnist[1][:1000], EPS)
    assert [by_eps[e] for e in EPS] == want
    assert report["clean_acc"] == 91.2 and report["dataset"] == "mnist" and report["threat_model"] == "Linf"
    assert report["architecture"] == "zoo:mnist-mlp" and report["n_examples"] == 1000 and report["eps"] == "0.3"


def test_inputs_outside_unit_range_are_refused():
    x = torch.rand(8, 1, 28, 28) * 2 - 0.5
    with pytest.raises(ValueError, match=r"inputs must be images in \[0, 1\].*--mean/--std"):
        rs.evaluate(rs.load_model("zoo:mnist-mlp-rs"), (x, torch.zeros(8, dtype=torch.long)), eps=[0.1])


def test_tuple_and_dict_outputs_are_wrapped_and_mode_is_restored(mnist):
    base = rs.load_model("zoo:mnist-mlp-rs")

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base
            self.drop = nn.Dropout(0.5)  # must be off during evaluation

        def forward(self, x):
            return self.drop(self.net(x)), {"aux": 1}

    class DictOut(TupleOut):
        def forward(self, x):
            return {"logits": self.drop(self.net(x)), "features": x}

    data = (mnist[0][:64], mnist[1][:64])
    plain = rs.evaluate(base, data, attacks=["pgd"], eps=[0.1], steps=5)
    for cls in (TupleOut, DictOut):
        m = cls().train()
        r = rs.evaluate(m, data, attacks=["pgd"], eps=[0.1], steps=5)
        assert m.training, "the model's mode must be restored"
        assert r.clean == {"model": plain.clean["model"]} and r.results[0]["robust_count"] == plain.results[0]["robust_count"]


def test_mean_std_normalisation_outside_the_model(mnist):
    base = rs.load_model("zoo:mnist-mlp-rs")

    class ExpectsNormalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x * 0.3 + 0.1)

    data = (mnist[0][:50], mnist[1][:50])
    a = rs.evaluate(base, data, attacks=["fgsm"], eps=[0.1])
    # the model computes base(z*0.3 + 0.1) of a normalised z = (x - 0.1) / 0.3, i.e. base(x)
    b = rs.evaluate(ExpectsNormalised(), data, attacks=["fgsm"], eps=[0.1], mean=[0.1], std=[0.3])
    assert a.clean == b.clean
    assert abs(a.results[0]["robust_acc"] - b.results[0]["robust_acc"]) <= 2.0


class _ThresholdModel(nn.Module):
    """Class 1 when pixel (0, 0) > 0.5, else class 0."""

    def forward(self, x):
        s = x[:, 0, 0, 0] - 0.5
        return torch.stack([-s, s], dim=1)


def test_worst_case_is_taken_per_point(monkeypatch):
    """Two attacks that each fool half the points, different halves: each alone leaves 50 %, the
    worst case (a point counts only if it survives every attack) 0 %; a minimum over attacks would say 50 %."""
    ev = importlib.import_module("robust_surgery.evaluation.run")  # the module (rs.evaluate is the function)

    class Flip:  # pushes pixel (0, 0) across the threshold on every other point, within ε
        def __init__(self, cfg, parity):
            self.eps, self.parity = cfg.eps, parity

        def __call__(self, x, y):
            adv = x.clone()
            adv[self.parity::2, :, 0, 0] -= self.eps
            return adv

    monkeypatch.setattr(ev, "build_attack", lambda cfg, target, n_classes, seed: Flip(cfg, 0 if cfg.name == "fgsm" else 1))
    x = torch.full((4, 1, 2, 2), 0.6)
    y = torch.ones(4, dtype=torch.long)
    r = rs.evaluate(_ThresholdModel(), (x, y), attacks=["fgsm", "pgd"], eps=[0.2], checks=False, batch_size=4,
                    per_attack=True)
    assert r.robust_acc("model", "fgsm", 0.2) == 50.0 and r.robust_acc("model", "pgd", 0.2) == 50.0
    assert r.worst("model") == {0.2: 0.0}


def test_compare_original_and_report_card(small_nrpm, mnist, tmp_path):
    data = (mnist[0][:60], mnist[1][:60])
    r = rs.evaluate(small_nrpm, data, attacks=["fgsm", "pgd"], eps=[0.0, 0.1, 0.3], steps=5, queries=50,
                    compare_original=True, batch_size=30)
    plain = rs.evaluate(rs.unconvert(small_nrpm), data, attacks=["fgsm", "pgd"], eps=[0.0, 0.1, 0.3], steps=5,
                        batch_size=30, checks=False)
    assert r.variants == ["nrpm", "original"]
    for e in (0.1, 0.3):
        for a in ("fgsm", "pgd"):
            assert r.robust_acc("original", a, e) == plain.robust_acc("model", a, e)
    names = [(c.name, c.eps) for c in r.checks]
    per_eps = ["stronger PGD adds little", "transfer from λ = 1 adds nothing", "BPDA adds nothing",
               "Square adds little to the gradient attacks", "FGSM adds nothing to the iterative attacks"]
    assert names == [("accuracy falls as ε grows", None), ("about 0 at a huge ε", None),
                     *[(c, e) for e in (0.1, 0.3) for c in per_eps],  # at every ε > 0, not only the largest
                     ("input gradients do not vanish", None), ("outputs are deterministic", None)]
    for c in r.checks:  # each per-ε line reads its row's count of newly broken points
        if c.eps is not None:
            row = next(x for x in r.results if x["model"] == "nrpm" and x["eps"] == c.eps and x["label"] == c.numbers["label"])
            assert c.numbers["broken_new"] == row["broken_new"] and c.passed == (row["broken_new"] <= c.numbers["allowed"])
    by = {c.name: c for c in r.checks}
    assert by["outputs are deterministic"].passed and by["input gradients do not vanish"].passed
    assert by["about 0 at a huge ε"].numbers["robust_acc"] <= 5.0
    # the headline is the worst over every attack run at that ε, per point
    worst = r.worst("nrpm")[0.3]
    at = [x["robust_acc"] for x in r.results if x["model"] == "nrpm" and x["eps"] == 0.3 and x["in_worst"]]
    assert worst <= min(at)  # per point: see test_worst_case_is_taken_per_point for a case where it is strictly lower
    assert r.worst("nrpm")[0.0] == 100.0 * r.clean["nrpm"] / 60
    d = r.to_dict()
    assert d["robust_acc"] == worst and len(d["checks"]) == 14 and d["suite"] == "custom" and d["adaptive"]
    json.dumps(d)  # JSON-serialisable
    from robust_surgery.evaluation.plot import plot_robustness_curve

    png = plot_robustness_curve(r, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from robust_surgery.evaluation.plot import plot_curves

    rows = plot_curves({"a": {0.0: 90.0, 0.1: 40.0}, "b": r.worst("nrpm")}, tmp_path / "rows.png", title="t")
    assert rows.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp*"))


def test_plain_models_get_no_checks_unless_asked(mnist):
    data = (mnist[0][:20], mnist[1][:20])
    r = rs.evaluate(rs.load_model("zoo:mnist-mlp-rs"), data, attacks=["fgsm"], eps=[0.1])
    assert r.checks == []
    with pytest.raises(ValueError, match="compare_original needs a converted model"):
        rs.evaluate(rs.load_model("zoo:mnist-mlp-rs"), data, eps=[0.1], compare_original=True)


def test_cw_and_autoattack_run_and_are_not_weaker_than_pgd(mnist):
    model = rs.load_model("zoo:mnist-mlp-rs")
    data = (mnist[0][:40], mnist[1][:40])
    r = rs.evaluate(model, data, attacks=["pgd", "autoattack"], eps=[0.1], steps=10, per_attack=True)
    assert r.robust_acc("model", "autoattack", 0.1) <= r.robust_acc("model", "pgd", 0.1) + 2.5
    assert r.to_dict()["autoattack_acc"] == r.robust_acc("model", "autoattack", 0.1)
    l2 = rs.evaluate(model, data, attacks=["fgsm", "pgd", "cw"], eps=[1.5], threat="L2", steps=10, per_attack=True)
    assert l2.robust_acc("model", "pgd", 1.5) < 100.0 * l2.clean["model"] / 40
    assert 0.0 <= l2.robust_acc("model", "cw", 1.5) <= 100.0 * l2.clean["model"] / 40


def test_apgd_is_autoattacks_untargeted_pair_on_the_points_it_keeps(mnist):
    """``apgd`` = APGD-CE, then APGD-DLR on the survivors: the count equals running torchattacks by hand."""
    import torchattacks

    model = rs.load_model("zoo:mnist-mlp-rs")
    x, y = mnist[0][:40], mnist[1][:40]
    r = rs.evaluate(model, (x, y), attacks=["apgd"], eps=[0.1], batch_size=40, checks=False)
    robust = torch.ones(40, dtype=torch.bool)
    for loss in ("ce", "dlr"):
        keep = robust.nonzero().flatten()
        adv = torchattacks.APGD(model, eps=0.1, steps=100, loss=loss, seed=0)(x[keep], y[keep])
        with torch.no_grad():
            robust[keep] &= model(adv).argmax(1) == y[keep]
    assert r.robust_acc("model", "apgd", 0.1) == 100.0 * int(robust.sum()) / 40
    assert r.robust_acc("model", "apgd", 0.1) < 100.0 * r.clean["model"] / 40


def test_resume_gives_the_same_numbers(small_nrpm, mnist, tmp_path):
    data = (mnist[0][:50], mnist[1][:50])
    kw = dict(attacks=["fgsm", "pgd"], eps=[0.1, 0.2], steps=4, batch_size=16, checks=False, seed=3)
    whole = rs.evaluate(small_nrpm, data, **kw)
    state = tmp_path / "run.state"
    part = rs.evaluate(small_nrpm, data, state=state, max_batches=2, **kw)
    assert not part.complete and part.batches_done == 2 and part.batches_total == 4 and state.exists()
    rest = rs.evaluate(small_nrpm, data, state=state, **kw)
    assert rest.complete
    assert rest.results == whole.results and rest.clean == whole.clean
    with pytest.raises(ValueError, match="belongs to another run: its seed is"):
        rs.evaluate(small_nrpm, data, state=state, **{**kw, "seed": 4})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_counts(tmp_path, shared_data):
    model_path = tmp_path / "nrpm.safetensors"
    rs.save(rs.convert(rs.load_model("zoo:mnist-mlp-rs"), K=1, lam=0.6), model_path)
    args = ["evaluate", str(model_path), "--data", "mnist", "--n-examples", "70", "--batch-size", "16", "--attack", "fgsm,pgd",
            "--eps", "0.1,0.2", "--steps", "4", "--no-checks", "--compare-original", "--seed", "5"]
    out = tmp_path / "dist.json"
    env = {**os.environ, "ROBUST_SURGERY_DATA": str(shared_data), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "robust_surgery.cli.app", *args, "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads(out.read_text())
    single = runner.invoke(app, [*args, "--json", "-"], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    assert dist["models"] == one["models"]
    assert [(r["key"], r["robust_count"]) for r in dist["results"]] == [(r["key"], r["robust_count"]) for r in one["results"]]
    assert dist["n_examples"] == one["n_examples"] == 70  # no padding


def test_transfer_and_bpda_at_every_eps_count_in_the_worst_case():
    """--attack transfer,bpda: PGD with the λ = 1 network's and the surrogate's gradients at every ε,
    shown as their own rows, part of the per-point worst case, read by the report card (no second run)."""
    from robust_surgery.evaluation.plan import plan_jobs

    plain = rs.load_model("zoo:mnist-mlp-rs")
    model = rs.convert(plain, **rs.preset_for(plain))
    rep = rs.evaluate(model, "mnist", attacks=["fgsm", "pgd", "transfer", "bpda"], eps=[0.1, 0.3], n=48, steps=5)
    for e in (0.1, 0.3):
        accs = [rep.robust_acc("nrpm", a, e) for a in ("fgsm", "pgd", "transfer", "bpda")]
        assert rep.worst("nrpm")[e] <= min(accs)
    checks = {(c.name, c.eps): c for c in rep.checks}
    for e in (0.1, 0.3):
        row = next(r for r in rep.results if r["label"] == "transfer" and r["eps"] == e)
        assert f"transfer PGD: {row['broken_new']} new point" in checks[("transfer from λ = 1 adds nothing", e)].detail
    jobs = plan_jobs(["pgd", "transfer", "bpda"], [0.1, 0.3], threat="Linf", variants=["nrpm"], checks=True, steps=5,
                     alpha=None, restarts=1, queries=100, x_numel=784)
    assert sorted(j.key for j in jobs if j.source != "direct") == [
        "nrpm/bpda:pgd-s5@0.1", "nrpm/bpda:pgd-s5@0.3", "nrpm/transfer:pgd-s5@0.1", "nrpm/transfer:pgd-s5@0.3"]
    with pytest.raises(ValueError, match="transfer and bpda attacks take their gradients from a converted model"):
        rs.evaluate(plain, "mnist", attacks=["transfer"], eps=[0.1], n=8)


def test_a_registered_attack_runs_by_name_and_counts_in_the_worst_case(mnist):
    """Attacks come from a registry: a user's own attack runs by name like the built-in ones."""
    import torchattacks

    from robust_surgery.evaluation import attacks

    @rs.register_attack("noise-test", gradient=False)
    def _noise(cfg, target, n_classes, seed):  # uniform noise in the ball: weaker than PGD
        class Noise(torchattacks.attack.Attack):
            def __init__(self, model):
                super().__init__("Noise", model)

            def forward(self, images, labels):
                g = torch.Generator().manual_seed(seed)
                return (images + cfg.eps * (2 * torch.rand(images.shape, generator=g) - 1)).clamp(0, 1)

        return Noise(target)

    try:
        assert "noise-test" in attacks.attack_names() and "noise-test" not in attacks.gradient_attacks()
        model = rs.load_model("zoo:mnist-mlp-rs")
        x, y = mnist[0][:50], mnist[1][:50]
        r = rs.evaluate(model, (x, y), attacks=["noise-test", "fgsm"], eps=[0.1], checks=False)
        noisy = (x + 0.1 * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1)).clamp(0, 1)
        with torch.no_grad():
            by_hand = int(((model(x).argmax(1) == y) & (model(noisy).argmax(1) == y)).sum())
        assert r.robust_acc("model", "noise-test", 0.1) == 100.0 * by_hand / 50
        assert r.worst("model")[0.1] <= r.robust_acc("model", "fgsm", 0.1)
    finally:
        attacks._REGISTRY.pop("noise-test", None)
    with pytest.raises(ValueError, match="unknown attack 'noise-test'"):
        rs.evaluate(model, (x, y), attacks=["noise-test"], eps=[0.1])
