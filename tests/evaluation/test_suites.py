"""Issue 29: the default worst case is adaptive at every ε, AutoAttack runs at its real strength, the
cascade gives the worst case of attacking every point, and the suites say what they are."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.data.datasets import load_mnist
from robust_surgery.nn.layers import linear_mode, straight_through_mode



@pytest.fixture(scope="module")
def first100(shared_data):
    x, y = load_mnist("test", shared_data)
    return x[:100], y[:100]


@pytest.fixture(scope="module")
def released_p1():
    """The NRPM release's MNIST MLP converted with the release's settings (its zoo preset)."""
    plain = rs.load_model("zoo:mnist-mlp")
    return rs.convert(plain, **rs.preset_for(plain))


def _outside_pgd(model, grad_model, x, y, eps, steps, restarts, seed):
    """Plain L∞ PGD written here, independent of robust_surgery.evaluation: random start, step
    2.5·ε/steps, gradients from ``grad_model`` (a context giving the gradient network), success
    judged on ``model``. Returns per point: still classified correctly after every restart."""
    g = torch.Generator().manual_seed(seed)
    alive = torch.ones(len(x), dtype=torch.bool)
    for _ in range(restarts):
        adv = (x + torch.empty(x.shape).uniform_(-eps, eps, generator=g)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            with grad_model(model):
                loss = F.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = (x + (adv.detach() + 2.5 * eps / steps * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        with torch.no_grad():
            alive &= model(adv).argmax(1) == y
    return alive


@pytest.mark.parametrize("eps", [pytest.param((0.1, 0.2), id="0.1,0.2"),
                                 pytest.param((0.05, 0.3), id="0.05,0.3", marks=pytest.mark.slow)])  # 0.05: ~3 min more
def test_no_outside_attack_beats_the_default_worst_case(released_p1, first100, eps):
    """PGD with restarts on the model, PGD transferred from the λ = 1 network and BPDA through the
    straight-through surrogate, all written here, never leave fewer points than `evaluate`'s default
    worst case at any ε (1 point allowed)."""
    import contextlib

    x, y = first100
    report = rs.evaluate(released_p1, (x, y), eps=eps)  # the default: the standard suite
    assert report.suite == "standard" and report.adaptive and report.cascade
    worst = report.worst("nrpm")
    with torch.no_grad():
        robust = released_p1(x).argmax(1) == y
    for e in eps:
        alive = robust.clone()
        for ctx, restarts in ((contextlib.nullcontext, 3), (linear_mode, 1), (straight_through_mode, 1)):
            alive &= _outside_pgd(released_p1, ctx, x, y, e, 50, restarts, seed=11)
        outside = 100.0 * int(alive.sum()) / len(x)
        assert worst[e] <= outside + 1.0, (e, worst[e], outside)


def test_the_cascade_gives_the_worst_case_of_attacking_every_point(released_p1, first100):
    """PGD's random starts are seeded per point, so attacking only the points still robust gives
    exactly the per-point worst case of running every attack on every point."""
    x, y = first100[0][:60], first100[1][:60]
    kw = dict(attacks=["fgsm", "pgd", "transfer", "bpda"], eps=[0.05, 0.1], steps=10, restarts=2, checks=False, seed=4,
              batch_size=25)
    cascade = rs.evaluate(released_p1, (x, y), **kw)
    every = rs.evaluate(released_p1, (x, y), per_attack=True, **kw)
    assert cascade.worst("nrpm") == every.worst("nrpm")
    # attacked alone, each attack's own number is at least the worst case, and in the cascade the rows fall
    for e in (0.05, 0.1):
        rows = [r for r in cascade.results if r["eps"] == e]
        assert [r["robust_acc"] for r in rows] == sorted((r["robust_acc"] for r in rows), reverse=True)
        assert all(every.robust_acc("nrpm", a, e) >= every.worst("nrpm")[e] for a in ("fgsm", "pgd", "transfer", "bpda"))
    # a batch size of its own (another split of the points into batches) changes nothing per point either
    assert rs.evaluate(released_p1, (x, y), **{**kw, "batch_size": 60}).worst("nrpm") == cascade.worst("nrpm")


def test_autoattack_runs_at_its_real_strength(first100):
    """APGD-CE and APGD-T with 100 iterations, APGD-T and FAB-T over 9 target classes, Square with
    5000 queries, in AutoAttack's order; recorded in every row."""
    from robust_surgery.evaluation.attacks import AttackConfig, AttackTarget, autoattack_parts, build_attack

    target = AttackTarget(rs.load_model("zoo:mnist-mlp-rs"))
    parts = autoattack_parts(0.1, "Linf")
    assert [p.name for p in parts] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    built = {p.name: build_attack(p, target, 10, 0) for p in parts}
    assert built["apgd-ce"].steps == 100 and built["apgd-ce"].loss == "ce"
    assert built["apgd-t"].steps == 100 and built["apgd-t"].n_target_classes == 9
    assert built["fab-t"].steps == 100 and built["fab-t"].n_target_classes == 9 and built["fab-t"].multi_targeted
    assert built["square"].n_queries == 5000
    aa = build_attack(AttackConfig("autoattack", 0.1), target, 10, 0)
    assert [a.steps if hasattr(a, "steps") else a.n_queries for a in aa.attacks] == [100, 100, 100, 5000]
    x, y = first100[0][:20], first100[1][:20]
    r = rs.evaluate(rs.load_model("zoo:mnist-mlp-rs"), (x, y), suite="standard", eps=[0.1])
    rows = {row["label"]: row for row in r.results}
    assert [k for k in rows] == ["autoattack:apgd-ce", "autoattack:apgd-t", "autoattack:fab-t", "autoattack:square"]
    assert [rows[k]["steps"] for k in list(rows)[:3]] == [100, 100, 100] and rows["autoattack:square"]["queries"] == 5000
    assert [rows[k]["targets"] for k in list(rows)[:3]] == [None, 9, 9]
    assert r.to_dict()["autoattack_acc"] == rows["autoattack:square"]["robust_acc"] == r.worst("model")[0.1]


def test_suites_say_what_they_are_and_opting_out_says_not_adaptive(released_p1, first100, tmp_path):
    x, y = first100[0][:10], first100[1][:10]
    quick = rs.evaluate(released_p1, (x, y), suite="quick", eps=[0.1])
    assert {r["label"] for r in quick.results} == {"fgsm", "pgd"} and not quick.checks
    assert not quick.adaptive and "NOT adaptive" in quick.note and "smoke test" in quick.note
    paper = rs.evaluate(released_p1, (x, y), suite="paper", eps=[0.1])
    assert [(r["label"], r["steps"]) for r in paper.results] == [("pgd", 20)] and "NOT a worst case" in paper.note
    custom = rs.evaluate(released_p1, (x, y), attacks=["pgd"], eps=[0.1], checks=False)
    assert custom.suite == "custom" and not custom.adaptive and "--no-checks" in custom.note
    with pytest.raises(ValueError, match="unknown suite 'strong'.*standard, quick, paper"):
        rs.evaluate(released_p1, (x, y), suite="strong", eps=[0.1])
    with pytest.raises(ValueError, match="not both"):
        rs.evaluate(released_p1, (x, y), suite="quick", attacks=["pgd"], eps=[0.1])
    # the suite is part of a state file's run: another suite cannot resume it
    state = tmp_path / "q.state"
    rs.evaluate(released_p1, (x, y), suite="quick", eps=[0.1], state=state)
    with pytest.raises(ValueError, match="belongs to another run"):
        rs.evaluate(released_p1, (x, y), suite="paper", eps=[0.1], state=state)


def test_cli_suite_json_and_progress_lines(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("ROBUST_SURGERY_PROGRESS_INTERVAL", "0")  # a log line on every update
    path = tmp_path / "p1.safetensors"
    plain = rs.load_model("zoo:mnist-mlp-rs")
    rs.save(rs.convert(plain, **rs.preset_for(plain)), path)
    res = CliRunner().invoke(app, ["evaluate", str(path), "--data", "mnist", "--suite", "quick", "--eps", "0.1",
                                   "--n", "30", "--json", "-"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["suite"] == "quick" and d["adaptive"] is False and "NOT adaptive" in d["note"]
    assert "batch 1/1 ε=0.1 nrpm pgd: " in res.stderr  # which attack, which ε, how many points
    bad = CliRunner().invoke(app, ["evaluate", str(path), "--data", "mnist", "--suite", "best", "--n", "5"])
    assert bad.exit_code == 1 and "error: unknown suite 'best'" in bad.output
