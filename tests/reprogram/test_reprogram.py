"""Reprogramming (AR, BAR): program geometry, label mappings, the zeroth-order estimator, the
query oracle, training on real MNIST, saving and `surgery evaluate` on the result."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import robust_surgery as rs
from robust_surgery.cli.app import app
from robust_surgery.reprogram.ar import ARConfig, reprogram_ar
from robust_surgery.reprogram.bar import BARConfig, reprogram_bar
from robust_surgery.reprogram.losses import class_balance_weights, focal_loss, mapped_nll
from robust_surgery.reprogram.mapping import LabelMapping, frequency_mapping, one_to_one, random_mapping
from robust_surgery.reprogram.pipeline import (ReprogrammedModel, load_target,
                                               save_reprogrammed, state_digest, target_accuracy)
from robust_surgery.reprogram.program import CanvasSpec, Program, centre_embed, data_mask
from robust_surgery.reprogram.query import QueryBudgetExceeded, QueryOracle
from robust_surgery.reprogram.zo import unit_sphere, zo_gradient

runner = CliRunner()


# ------------------------------------------------------------------ program geometry
def test_mask_leaves_the_data_region_untouched():
    spec = CanvasSpec((3, 32, 32), data_size=28, data_channels=1)
    prog = Program(spec)
    with torch.no_grad():
        prog.weight.normal_(0, 3.0)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = prog(x)
    assert out.shape == (4, 3, 32, 32)
    top, left = spec.offset
    assert (top, left) == (2, 2)
    for c in range(3):  # grey copied to every channel, bit for bit
        assert torch.equal(out[:, c, 2:30, 2:30], x[:, 0])
    m = data_mask(spec)[0]
    assert m.sum() == 32 * 32 - 28 * 28 and m[2:30, 2:30].sum() == 0
    outside = out[:, :, m.bool()]
    expected = ((torch.tanh(prog.weight) + 1) / 2)[:, m.bool()]
    assert torch.allclose(outside, expected.expand_as(outside))
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_resize_option_and_low_dimensional_program():
    spec = CanvasSpec((3, 32, 32), data_size=16)
    x = torch.rand(2, 1, 28, 28)
    emb = centre_embed(x, spec)
    assert emb.shape == (2, 3, 32, 32) and spec.offset == (8, 8)
    assert torch.allclose(emb[:, 0, 8:24, 8:24], torch.nn.functional.interpolate(
        x, size=(16, 16), mode="bilinear", antialias=True)[:, 0].clamp(0, 1))
    assert emb[:, :, :8].abs().sum() == 0
    prog = Program(spec, low_dim=4)
    assert prog.d == 3 * 4 * 4 and prog.full_weight().shape == (3, 32, 32)
    with torch.no_grad():
        prog.weight.copy_(torch.arange(48.0).view(3, 4, 4) / 48)
    assert torch.equal(prog.full_weight()[0, :8, :8], torch.full((8, 8), 0.0))
    assert torch.equal(prog.full_weight()[0, 24:, 24:], torch.full((8, 8), 15 / 48))
    ws = torch.randn(5, 3, 4, 4)
    many = prog.batched(x, ws)
    assert many.shape == (5, 2, 3, 32, 32)
    assert torch.allclose(many[3], prog(x, ws[3]))
    with pytest.raises(ValueError, match="data_size"):
        CanvasSpec((3, 32, 32), data_size=40)
    with pytest.raises(ValueError, match="channels"):
        CanvasSpec((3, 32, 32), data_channels=2)


# ------------------------------------------------------------------ label mappings and losses
def test_frequency_mapping_on_a_crafted_histogram():
    # counts[source, target]; greedy: (s2,t0)=9, then (s0,t1)=8 (s2 taken), then (s4,t2)=6 ...
    counts = torch.tensor([[0, 8, 1],
                           [5, 7, 0],
                           [9, 9, 0],
                           [2, 0, 3],
                           [0, 1, 6]])
    pred, target = [], []
    for s in range(5):
        for t in range(3):
            pred += [s] * int(counts[s, t])
            target += [t] * int(counts[s, t])
    perm = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
    pred, target = torch.tensor(pred)[perm], torch.tensor(target)[perm]
    mp = frequency_mapping(pred, target, n_target=3, n_source=5, m=1)
    assert mp.assignment.tolist() == [[2], [0], [4]]
    # m = 2 of 6 source labels (s5 never predicted): t0 <- s2 (9, the tie with (s2, t1) goes to the smaller
    # target), t1 <- s0 (8), t1 <- s1 (7; t1 full), t2 <- s4 (6), t2 <- s3 (3; t2 full), t0 <- s5 (0)
    mp2 = frequency_mapping(pred, target, n_target=3, n_source=6, m=2)
    assert mp2.assignment.tolist() == [[2, 5], [0, 1], [4, 3]]
    probs = torch.zeros(2, 6)
    probs[0, 4] = 0.6
    probs[0, 3] = 0.2
    assert torch.allclose(mp2(probs)[0], torch.tensor([0.0, 0.0, 0.4]))


def test_one_to_one_random_mappings_and_errors():
    assert one_to_one(3, 10).assignment.flatten().tolist() == [0, 1, 2]
    r = random_mapping(4, 1000, m=5, seed=1)
    assert r.assignment.shape == (4, 5) and r.assignment.unique().numel() == 20
    assert torch.equal(r.assignment, random_mapping(4, 1000, m=5, seed=1).assignment)
    with pytest.raises(ValueError, match="lower m"):
        random_mapping(10, 10, m=2)
    with pytest.raises(ValueError, match="two target classes"):
        LabelMapping(torch.tensor([[0, 1], [1, 2]]), 5)


def test_focal_loss_reduces_to_cross_entropy_and_weights_balance_classes():
    h = torch.softmax(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(focal_loss(h, y, gamma=0.0), mapped_nll(h, y))
    hy = h[torch.arange(6), y]
    assert torch.allclose(focal_loss(h, y, gamma=2.0), (-(1 - hy) ** 2 * hy.log()).mean())
    w = class_balance_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2, 0.0]))
    stacked = focal_loss(torch.stack([h, h]), y, 2.0, w.new_ones(4))
    assert stacked.shape == (2,) and torch.allclose(stacked, focal_loss(h, y, 2.0).expand(2))


# ------------------------------------------------------------------ zeroth-order estimator and query oracle
def test_zo_estimate_aligns_with_the_true_gradient_more_as_q_grows():
    torch.manual_seed(0)
    d = 64
    A = torch.randn(d, d) / math.sqrt(d)
    c = torch.randn(d)
    f = lambda ws: ((ws @ A.T - c) ** 2).sum(-1)  # noqa: E731
    w = torch.randn(d)
    true = 2 * A.T @ (A @ w - c)
    g = torch.Generator().manual_seed(1)
    cos = {}
    for q in (1, 10, 100):
        vals = [torch.nn.functional.cosine_similarity(zo_gradient(f, w, q, 1e-3, g)[0], true, dim=0) for _ in range(30)]
        cos[q] = float(torch.stack(vals).mean())
    assert cos[1] < cos[10] < cos[100]
    # E[cos] of a random-direction estimate ≈ sqrt(q / d) while q << d, then saturates
    assert 0.05 < cos[1] < 0.25 and 0.3 < cos[10] < 0.5 and cos[100] > 0.7
    u = unit_sphere(7, (3, 4), g)
    assert torch.allclose(u.flatten(1).norm(dim=1), torch.ones(7))


class _Spy(nn.Module):
    """A small CIFAR-shaped source that records forward calls with gradients on and any backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 10))
        self.grad_forwards = 0
        self.backwards = 0
        self.net.register_full_backward_hook(self._on_backward)

    def _on_backward(self, *_):
        self.backwards += 1

    def forward(self, x):
        self.grad_forwards += int(torch.is_grad_enabled())
        return self.net(x)


def test_bar_never_differentiates_through_the_source_and_counts_queries():
    spy = _Spy()
    x, y = load_target("mnist", "train", n=64)
    cfg = BARConfig(steps=3, q=4, batch_size=16)
    before = state_digest(spy)
    model, report = reprogram_bar(spy, x, y, cfg, canvas=(3, 32, 32), data_size=16, low_dim=4, mapping="frequency")
    assert spy.grad_forwards == 0 and spy.backwards == 0
    assert all(p.grad is None and not p.requires_grad for p in spy.parameters())
    assert state_digest(spy) == before
    # setup: one query for the class count, 64 for the frequency mapping; then batch × (q + 1) per step
    assert report["mapping_queries"] == 1 + 64
    assert report["queries"] - report["mapping_queries"] == 3 * 16 * (4 + 1)
    assert [h["queries"] for h in report["history"]] == [65 + k * 80 for k in (1, 2, 3)]
    assert report["cost"] == pytest.approx(report["queries"] / 1000)
    assert not torch.equal(model.program.weight, torch.zeros_like(model.program.weight))


def test_query_oracle_returns_detached_probabilities_and_enforces_its_budget():
    spy = _Spy()
    oracle = QueryOracle(spy, budget=10, price_per_1000=2.5)
    x = torch.rand(6, 3, 32, 32, requires_grad=True)
    p = oracle(x)
    assert p.shape == (6, 10) and not p.requires_grad and p.grad_fn is None
    assert torch.allclose(p.sum(1), torch.ones(6))
    assert oracle.queries == 6 and oracle.remaining() == 4 and oracle.cost() == pytest.approx(0.015)
    with pytest.raises(QueryBudgetExceeded, match="budget of 10"):
        oracle(x)
    assert oracle.queries == 6 and spy.grad_forwards == 0


def test_bar_stops_at_its_query_budget():
    spy = _Spy()
    x, y = load_target("mnist", "train", n=32)
    cfg = BARConfig(steps=50, q=3, batch_size=8, budget=33 + 5 * 32 + 10)
    _, report = reprogram_bar(spy, x, y, cfg, canvas=(3, 32, 32), data_size=16, low_dim=4)
    assert report["steps"] == 5 and report["queries"] == 33 + 5 * 32


# ------------------------------------------------------------------ AR on real data
@pytest.fixture(scope="module")
def mnist_small():
    return load_target("mnist", "train", n=2000), load_target("mnist", "test", n=500)


def test_ar_on_mnist_beats_an_untrained_source_and_leaves_the_source_untouched(mnist_small):
    (x, y), (xt, yt) = mnist_small
    cfg = ARConfig(epochs=1, lr=0.1, batch_size=32)
    accs = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        src = rs.build_arch("zoo:cifar-resnet20", pretrained=pretrained)
        before = state_digest(src)
        model, report = reprogram_ar(src, x, y, cfg, data_size=16)
        assert state_digest(model.source) == before
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["program.weight"]
        accs[pretrained] = target_accuracy(model, xt, yt)["clean_acc"]
    # measured: 46.4 % vs 14.4 % (one epoch on 2000 digits, 500 test digits)
    assert accs[True] > 35.0 and accs[True] > accs[False] + 20.0, accs


# ------------------------------------------------------------------ saving, loading, evaluating
def test_pipeline_with_an_nrpm_source_saves_and_reloads_from_the_file_alone(tmp_path):
    x, y = load_target("mnist", "train", n=64)
    src = rs.convert(rs.load_model("zoo:cifar-resnet20"), norm="L1", K=1, lam=0.5, include=["linear"])
    model, report = reprogram_ar(src, x, y, ARConfig(epochs=1, batch_size=32), mapping="frequency")
    path = tmp_path / "ar.safetensors"
    manifest = save_reprogrammed(model, path, reprogram=report)
    assert manifest["arch"] == "robust_surgery.reprogram.pipeline:build_reprogrammed"
    assert manifest["arch_kwargs"]["source_arch"] == "zoo:cifar-resnet20"
    assert manifest["arch_kwargs"]["mapping"]["assignment"] == model.mapping.assignment.tolist()
    assert set(manifest["layers"]) == {"source.linear"} and manifest["reprogram"]["method"] == "ar"
    back = rs.load(path)
    assert isinstance(back, ReprogrammedModel) and isinstance(back.source.linear, rs.NRPMLinear)
    assert back.source.linear.lam_value == pytest.approx(0.5)
    with torch.no_grad():
        assert torch.equal(back(x[:8]), model(x[:8]))
        assert torch.allclose(back(x[:8]).exp(), back.mapped_probs(x[:8]))
    # the evaluation of a converted model, report card included, runs on the pipeline
    xt, yt = load_target("mnist", "test", n=4)
    report = rs.evaluate(back, (xt, yt), attacks=("fgsm",), eps=(0.1,), steps=3, queries=50)
    assert report.variants == ["nrpm"] and report.complete
    assert {"transfer", "bpda", "square"} <= {r["check"] for r in report.to_dict()["results"]}
    assert len(report.checks) == 9 and all(c.passed is not None for c in report.checks)
    assert report.to_dict()["clean_acc"] == target_accuracy(back, xt, yt)["clean_acc"]
    with pytest.raises(TypeError, match="ReprogrammedModel"):
        save_reprogrammed(src, tmp_path / "no.safetensors")
    bare = ReprogrammedModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)),
                             Program(CanvasSpec((3, 32, 32), 16)), one_to_one(10, 10))
    with pytest.raises(ValueError, match="no architecture"):
        save_reprogrammed(bare, tmp_path / "bare.safetensors")
    assert not (tmp_path / "bare.safetensors").exists()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_ar_and_bar_write_pipelines_that_surgery_evaluate_attacks(tmp_path):
    out = tmp_path / "ar.safetensors"
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--n-train", 128, "--n-test", 32, "--epochs", 1,
               "--attack", "fgsm", "--eps", "0.1", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["output"] == str(out) and data["report"]["method"] == "ar" and data["report"]["n_train"] == 128
    test = data["report"]["test"]
    assert test["n_examples"] == 32 and test["robust_acc"]["fgsm"]["0.1"] <= test["clean_acc"]
    res = _cli("evaluate", out, "--data", "mnist", "--n", 32, "--attack", "fgsm", "--eps", "0.1", "--json", "-")
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["clean_acc"] == pytest.approx(test["clean_acc"])
    assert ev["robust_acc"] == pytest.approx(test["robust_acc"]["fgsm"]["0.1"])

    out_bar = tmp_path / "bar.safetensors"
    res = _cli("reprogram", "bar", "zoo:cifar-resnet20", "--n-train", 64, "--n-test", 32, "--train-steps", 2,
               "--q", 3, "--batch-size", 8, "--price", 2.0, "-o", out_bar)
    assert res.exit_code == 0, res.output
    assert "queries" in res.stdout and "saved" in res.stdout
    manifest = rs.read_manifest(out_bar)
    rep = manifest["reprogram"]
    assert rep["queries"] == 1 + 64 + 2 * 8 * 4 and rep["cost"] == pytest.approx(rep["queries"] * 2.0 / 1000)
    assert manifest["arch_kwargs"]["program"]["low_dim"] == 8


def test_cli_reprogram_errors_are_one_line(tmp_path, shared_data):  # zoo:cifar-resnet20 reads its weights there
    res = _cli("reprogram", "bar", "zoo:cifar-resnet20", "--budget", 10, "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 1 and "does not cover one step" in res.stderr and "Traceback" not in res.output
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--data-size", 40, "--n-train", 16, "-o", tmp_path / "a.safetensors")
    assert res.exit_code == 1 and "data_size" in res.stderr
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--mapping", "best", "--n-train", 16, "-o", tmp_path / "a.safetensors")
    assert res.exit_code == 1 and "unknown mapping" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", ["ar", "bar"])
def test_reprogram_help_has_an_example(cmd):
    res = _cli("reprogram", cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout and f"surgery reprogram {cmd}" in res.stdout


# ------------------------------------------------------------------ device and precision
def test_ar_and_bar_under_bf16_autocast_land_near_float32(mnist_small):
    """AR trains and BAR queries with the source under bf16 autocast: the report records it, the
    oracle still returns float32 probabilities, and accuracy stays near float32 (stated tolerance:
    5 points on 500 digits after one AR epoch on 2000; 0.1 on a probability)."""
    (x, y), (xt, yt) = mnist_small
    accs = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        src = rs.build_arch("zoo:cifar-resnet20", pretrained=True)
        model, report = reprogram_ar(src, x, y, ARConfig(epochs=1, lr=0.1, batch_size=32), data_size=16,
                                     device="cpu", amp=amp)
        assert report["amp"] == amp and report["device"] == "cpu"
        assert all(math.isfinite(r["loss"]) for r in report["history"])
        accs[amp] = target_accuracy(model, xt, yt, amp=amp)["clean_acc"]
    assert abs(accs[None] - accs["bf16"]) <= 5.0, accs
    src = rs.build_arch("zoo:cifar-resnet20", pretrained=True).eval()
    z = torch.rand(8, 3, 32, 32)
    p32, p16 = QueryOracle(src)(z), QueryOracle(src, amp="bf16")(z)
    assert p16.dtype == torch.float32 and torch.allclose(p16.sum(1), torch.ones(8), atol=1e-5)
    assert float((p16 - p32).abs().max()) < 0.1  # measured 0.05 through 20 bf16 layers
    assert (p16.argmax(1) == p32.argmax(1)).sum() >= 7


def test_cli_reprogram_refuses_unknown_device_and_amp_words_before_loading(tmp_path):
    for flag, word, message in (("--device", "tpu", "--device must be auto, cpu, cuda or cuda:N"),
                                ("--amp", "fp8", "--amp must be one of none, bf16, fp16")):
        res = _cli("reprogram", "ar", "zoo:cifar-resnet20", flag, word, "-o", tmp_path / "a.safetensors")
        assert res.exit_code == 1 and message in res.stderr and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ iterative label mapping
class _Scripted:
    """A stand-in source whose predictions follow a script, one list of source labels per round
    (the 'program' is the identity; each call to it is one round)."""

    def __init__(self, rounds, n_source=4):
        self.rounds, self.n_source, self.calls = rounds, n_source, 0

    def __call__(self, z):
        labels = torch.tensor(self.rounds[min(self.calls, len(self.rounds) - 1)])[z[:, 0].long()]
        self.calls += 1
        return nn.functional.one_hot(labels, self.n_source).float()


def test_ilm_re_solves_the_frequency_mapping_from_the_current_predictions():
    from robust_surgery.reprogram.pipeline import choose_mapping, remap_iteratively

    x = torch.arange(6, dtype=torch.float32).view(6, 1)  # example i carries its index
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    source = _Scripted([[2, 2, 2, 3, 3, 3],   # round 0: target 0 -> source 2, target 1 -> source 3
                        [1, 1, 2, 0, 0, 3],   # round 1: (s0, t1) and (s1, t0) twice each: t1 <- 0 first, then t0 <- 1
                        [1, 1, 2, 0, 0, 3]])  # round 2: nothing new
    identity = nn.Identity()
    mapping = choose_mapping("ilm", y, 2, 4, probs_fn=source, program=identity, x=x)
    assert mapping.assignment.tolist() == [[2], [3]]
    assert remap_iteratively(mapping, source, identity, x, y) is True
    assert mapping.assignment.tolist() == [[1], [0]]
    assert remap_iteratively(mapping, source, identity, x, y) is False and mapping.assignment.tolist() == [[1], [0]]


def test_ar_and_bar_with_ilm_remap_between_epochs_and_count_the_queries():
    x, y = load_target("mnist", "train", n=64)
    _, report = reprogram_ar(_Spy(), x, y, ARConfig(epochs=3, batch_size=32), canvas=(3, 32, 32), mapping="ilm")
    assert [("mapping_changed" in row) for row in report["history"]] == [True, True, False]
    cfg = BARConfig(steps=4, q=2, batch_size=32)
    _, rep = reprogram_bar(_Spy(), x, y, cfg, canvas=(3, 32, 32), low_dim=4, mapping="ilm")
    # 1 probe + 64 for the first mapping, 4 steps × 32 × 3, one re-map after step 2 (64; none after the last)
    assert rep["queries"] == 1 + 64 + 4 * 32 * 3 + 64 and rep["mapping"] == "ilm"


def test_cli_takes_mapping_ilm(tmp_path):
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--n-train", 64, "--n-test", 32, "--epochs", 2,
               "--mapping", "ilm", "-o", tmp_path / "ilm.safetensors", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["report"]
    assert report["mapping"] == "ilm" and "mapping_changed" in report["history"][0]


def test_adversarial_program_training_learns_on_pgd_copies_within_the_budget(monkeypatch):
    from robust_surgery.reprogram import ar

    seen = []
    real = ar._pgd_batch

    def recording(model, xb, yb, cfg, seed):
        x_adv = real(model, xb, yb, cfg, seed)
        seen.append(float((x_adv - xb).abs().max()))
        return x_adv

    monkeypatch.setattr(ar, "_pgd_batch", recording)
    x, y = load_target("mnist", "train", n=64)
    _, report = reprogram_ar(_Spy(), x, y, ARConfig(epochs=1, batch_size=32, adv_eps=0.1, adv_steps=2),
                             canvas=(3, 32, 32))
    assert len(seen) == 2 and all(0.0 < d <= 0.1 + 1e-6 for d in seen), seen
    assert report["config"]["adv_eps"] == 0.1 and math.isfinite(report["history"][0]["loss"])
    with pytest.raises(rs.errors.InvalidInputError, match="0 <= adv_eps <= 1"):
        ARConfig(adv_eps=2.0)


def test_bar_history_spacing_and_extra_fields_for_accuracy_curves():
    from robust_surgery.reprogram.bar import train_bar
    from robust_surgery.reprogram.mapping import one_to_one

    x, y = load_target("mnist", "train", n=32)
    program = Program(CanvasSpec((3, 32, 32), 16, 1), 4)
    oracle = QueryOracle(_Spy())
    seen = []
    result = train_bar(program, one_to_one(10, 10), oracle, x, y, BARConfig(steps=3, q=2, batch_size=8),
                       log_every=1, on_log=lambda rec: seen.append(rec["queries"]) or {"held_out": len(seen)})
    assert [r["held_out"] for r in result["history"]] == [1, 2, 3] and seen == [24, 48, 72]


def test_target_accuracy_reports_the_per_point_worst_case_over_its_attacks():
    x, y = load_target("mnist", "train", n=64)
    xt, yt = load_target("mnist", "test", n=32)
    torch.manual_seed(0)
    model, _ = reprogram_ar(_Spy(), x, y, ARConfig(epochs=1, batch_size=32), canvas=(3, 32, 32))
    res = target_accuracy(model, xt, yt, attacks=("fgsm", "pgd"), eps=(0.05, 0.2), steps=5)
    assert set(res["worst_acc"]) == {"0.05", "0.2"}
    for e, worst in res["worst_acc"].items():
        fgsm, pgd = res["robust_acc"]["fgsm"][e], res["robust_acc"]["pgd"][e]
        # the points robust to both: at most either set, at least their overlap inside the clean-correct ones
        assert max(0.0, fgsm + pgd - res["clean_acc"]) - 1e-9 <= worst <= min(fgsm, pgd) + 1e-9, res
    one = target_accuracy(model, xt, yt, attacks=("fgsm",), eps=(0.2,))
    assert one["worst_acc"]["0.2"] == one["robust_acc"]["fgsm"]["0.2"]
    assert target_accuracy(model, xt, yt)["worst_acc"] == {}


def test_cover_data_program_adds_a_bounded_pattern_to_the_data_and_round_trips(tmp_path):
    spec = CanvasSpec((3, 32, 32), 16)
    x = torch.rand(4, 1, 28, 28)
    plain, covered = Program(spec), Program(spec, cover_data=True)
    assert torch.equal(plain(x), covered(x))  # W = 0: the same input either way
    torch.manual_seed(0)
    w = torch.randn(3, 32, 32)
    inside = 1.0 - data_mask(spec)
    expected = inside * (centre_embed(x, spec) + torch.tanh(w) / 2).clamp(0, 1) + (1 - inside) * plain.perturbation(w)
    assert torch.allclose(covered(x, w), expected)
    assert torch.equal(plain(x, w) * inside, centre_embed(x, spec) * inside)  # without it the data stays
    ws = torch.stack([w, -w])
    assert torch.allclose(covered.batched(x, ws)[1], covered(x, -w))  # BAR's k programs at once
    # trained by AR, saved, and rebuilt from the file with the same geometry
    xs, ys = load_target("mnist", "train", n=64)
    model, report = reprogram_ar(rs.load_model("zoo:cifar-resnet20"), xs, ys, ARConfig(epochs=1, batch_size=32),
                                 cover_data=True)
    assert report["cover_data"]
    assert (model.program.weight.detach() * inside).abs().sum() > 0  # the data region's entries trained
    path = tmp_path / "cover.safetensors"
    manifest = save_reprogrammed(model, path, reprogram=report)
    assert manifest["arch_kwargs"]["program"]["cover_data"] is True
    back = rs.load(path)
    assert back.program.cover_data
    with torch.no_grad():
        assert torch.equal(back(xs[:8]), model(xs[:8]))


def test_linear_mapping_starts_at_one_to_one_and_rebuilds_only_known_kinds():
    from robust_surgery.reprogram.mapping import LinearMapping, mapping_from_dict

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(5, 12), dim=-1)
    lin = LinearMapping(10, 12)
    renormalised = probs[:, :10] / probs[:, :10].sum(dim=1, keepdim=True)  # one-to-one, over the target classes
    assert torch.allclose(lin(probs), renormalised, atol=1e-6)
    assert torch.allclose(lin(probs).sum(dim=1), torch.ones(5))
    assert isinstance(mapping_from_dict(lin.to_dict()), LinearMapping)
    table = one_to_one(10, 12)
    assert torch.equal(mapping_from_dict(table.to_dict()).assignment, table.assignment)  # files without a kind
    with pytest.raises(rs.errors.InvalidInputError, match="unknown label-mapping kind 'os.system'"):
        mapping_from_dict({"kind": "os.system", "n_source": 10, "n_target": 10})
    with pytest.raises(rs.errors.InvalidInputError, match="gives 11 classes"):
        lin(torch.rand(2, 11))


def test_ar_with_a_linear_mapping_trains_it_at_its_own_rate_and_round_trips(tmp_path):
    x, y = load_target("mnist", "train", n=64)
    src = rs.load_model("zoo:cifar-resnet20")
    before = state_digest(src)
    cfg = ARConfig(epochs=3, batch_size=32, lr=0.1, mapping_lr=0.02, decay=0.5, decay_every=1)
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):  # the learning rates each step runs with: (W's, the mapping's)
        seen.append(tuple(g["lr"] for g in self.param_groups))
        return real_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", spy)
        model, report = reprogram_ar(src, x, y, cfg, mapping="linear")
    assert state_digest(model.source) == before
    assert sorted({s for s in seen}) == sorted({(0.1, 0.02), (0.05, 0.01), (0.025, 0.005)})
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["program.weight", "mapping.weight",
                                                                           "mapping.bias"]
    assert not torch.equal(model.mapping.weight.detach(), torch.eye(10))  # it learned
    path = tmp_path / "linear.safetensors"
    manifest = save_reprogrammed(model, path, reprogram=report)
    assert manifest["arch_kwargs"]["mapping"] == {"kind": "linear", "n_source": 10, "n_target": 10}
    back = rs.load(path)
    with torch.no_grad():
        assert torch.equal(back(x[:8]), model(x[:8]))
    with pytest.raises(rs.errors.InvalidInputError, match="BAR cannot train the linear mapping"):
        reprogram_bar(_Spy(), x, y, BARConfig(steps=1, q=1, batch_size=8), canvas=(3, 32, 32), mapping="linear")
    with pytest.raises(rs.errors.InvalidInputError, match="drop --m"):
        reprogram_ar(_Spy(), x, y, cfg, canvas=(3, 32, 32), mapping="linear", m=2)


def test_cli_takes_mapping_linear(tmp_path):
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--n-train", 64, "--n-test", 32, "--epochs", 1,
               "--mapping", "linear", "--mapping-lr", 0.05, "-o", tmp_path / "lin.safetensors", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["report"]
    assert report["mapping"] == "linear" and report["config"]["mapping_lr"] == 0.05
    res = _cli("reprogram", "ar", "zoo:cifar-resnet20", "--mapping-lr", 0, "--n-train", 16, "-o", tmp_path / "z.safetensors")
    assert res.exit_code == 1 and "mapping_lr > 0" in res.stderr and not (tmp_path / "z.safetensors").exists()
