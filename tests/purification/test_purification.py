"""Purity scores, bases and basis-free diagnostics against known answers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust_surgery.purification.diagnostics import (checkpoint_pair, get_layer, hook_diagnostics, layer_input_patches,
                                         next_layer_weights, purification_report, whitened_random_basis)
from robust_surgery.purification.scores import (dictionary_basis, entropy_count, gini, hoyer, ica_basis, layer_units,
                                   load_basis_file, participation_ratio, purity_scores, random_orthonormal_basis,
                                   top_k_energy)
from robust_surgery.purification.synthetic import SparseCodingTask, parse_synthetic_spec, sparse_coding_mlp


def test_known_answers_one_hot_and_flat():
    n = 64
    one_hot = torch.zeros(n)
    one_hot[5] = -3.0
    flat = torch.full((n,), 0.7)
    flat[::2] *= -1  # signs do not matter
    assert participation_ratio(one_hot).item() == pytest.approx(1.0, abs=1e-12)
    assert participation_ratio(flat).item() == pytest.approx(n, abs=1e-9)
    assert hoyer(one_hot).item() == pytest.approx(1.0, abs=1e-12)
    assert hoyer(flat).item() == pytest.approx(0.0, abs=1e-12)
    assert gini(one_hot).item() == pytest.approx(1 - 1 / n, abs=1e-12)
    assert gini(flat).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy_count(one_hot).item() == pytest.approx(1.0, abs=1e-9)
    assert entropy_count(flat).item() == pytest.approx(n, abs=1e-9)
    assert top_k_energy(one_hot, 1).item() == pytest.approx(1.0)
    assert top_k_energy(flat, 4).item() == pytest.approx(4 / n)
    # k equal atoms: PR = entropy count = k, top-k energy = 1
    two = torch.zeros(n)
    two[[1, 9]] = torch.tensor([2.0, -2.0])
    assert participation_ratio(two).item() == pytest.approx(2.0)
    assert entropy_count(two).item() == pytest.approx(2.0)
    assert top_k_energy(two, 2).item() == pytest.approx(1.0)


def test_scores_are_per_row_and_gaussian_pr_is_about_n_plus_2_over_3():
    n = 30
    r = torch.randn(4000, n, generator=torch.Generator().manual_seed(0))
    pr = participation_ratio(r)
    assert pr.shape == (4000,)
    # (n + 2) / 3 is E(Σr²)² / E Σr⁴ exactly; the mean of the ratio is a little above it
    e = r.double() ** 2
    assert ((e.sum(1) ** 2).mean() / (e ** 2).sum(1).mean()).item() == pytest.approx((n + 2) / 3, rel=0.02)
    assert pr.mean().item() == pytest.approx((n + 2) / 3, rel=0.1)
    assert torch.allclose(pr[7], participation_ratio(r[7]))
    # Hoyer/Gini are scale-invariant
    assert torch.allclose(hoyer(r[:5] * 10), hoyer(r[:5]))
    assert torch.allclose(gini(r[:5] * 0.1), gini(r[:5]))


def test_purity_in_the_true_basis_and_shape_errors():
    task = SparseCodingTask(d=16, n_train=10, n_test=10)
    m = task.dictionary
    assert torch.allclose(m.T @ m, torch.eye(16), atol=1e-5)
    units = torch.stack([m[:, 3], -2 * m[:, 7], m[:, 0] + m[:, 1]])  # pure, pure, two atoms
    s = purity_scores(units, m, name="true")
    assert s.pr.tolist() == pytest.approx([1.0, 1.0, 2.0], abs=1e-5)
    assert s.summary()["pr"]["mean"] == pytest.approx(4 / 3, abs=1e-5)
    weighted = purity_scores(units, m, unit_weights=torch.tensor([0.0, 0.0, 1.0])).summary()
    assert weighted["pr"]["weighted_mean"] == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="fan-in"):
        purity_scores(units, torch.eye(8))
    with pytest.raises(ValueError, match="Linear or Conv"):
        layer_units(nn.ReLU())
    with pytest.raises(ValueError, match="grouped"):
        layer_units(nn.Conv2d(4, 4, 3, groups=4))


def test_random_orthonormal_basis_is_orthonormal_and_seeded():
    q = random_orthonormal_basis(12, seed=3).atoms
    assert torch.allclose(q.T @ q, torch.eye(12), atol=1e-5)
    assert torch.equal(q, random_orthonormal_basis(12, seed=3).atoms)
    assert not torch.equal(q, random_orthonormal_basis(12, seed=4).atoms)


def test_ica_recovers_the_true_atoms_of_synthetic_data():
    # (with k = 3 of d = 16 active the codes are too dense for FastICA: it finds 1 atom of 16)
    task = SparseCodingTask(d=32, n_train=4000, n_test=10)
    x, _, _ = task.features("train")
    basis = ica_basis(x, seed=0)
    a = basis.atoms / basis.atoms.norm(dim=0, keepdim=True)
    cos = (task.dictionary.T @ a).abs()  # true atom i vs learned atom j
    assert cos.max(1).values.min().item() >= 0.99  # every true atom found
    # purity of the true atoms measured in the ICA basis: close to pure
    pr = purity_scores(task.dictionary.T, basis.atoms).pr
    assert pr.max().item() < 1.1


def test_dictionary_basis_shapes_and_errors(tmp_path):
    x = torch.randn(600, 9, generator=torch.Generator().manual_seed(0))
    b = dictionary_basis(x, n_atoms=6, seed=0, max_iter=3)
    assert b.atoms.shape == (9, 6) and b.name == "dict"
    with pytest.raises(ValueError, match="too few"):
        ica_basis(x[:10])
    with pytest.raises(FileNotFoundError, match="--basis"):
        load_basis_file(tmp_path / "nope.pt")
    torch.save({"atoms": torch.eye(5)}, tmp_path / "b.pt")
    assert torch.equal(load_basis_file(tmp_path / "b.pt").atoms, torch.eye(5))


def test_kurtosis_and_activation_rate_through_hooks():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(40000, 2, generator=g)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((40000, 1))
    model = nn.Sequential(nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
    stats = hook_diagnostics(model, torch.cat([gauss, laplace], 1), ["0"])["0"]
    assert stats["kurtosis"][:2].tolist() == pytest.approx([3.0, 3.0], abs=0.15)
    assert stats["kurtosis"][2].item() == pytest.approx(6.0, abs=0.8)  # Laplace: heavy-tailed
    assert stats["active"].tolist() == pytest.approx([0.5, 0.5, 0.5], abs=0.02)
    assert stats["samples"] == 40000
    # conv feature maps: statistics over samples and positions
    conv = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False))
    with torch.no_grad():
        conv[0].weight.fill_(1.0)
    c = hook_diagnostics(conv, torch.randn(100, 1, 20, 20, generator=g))["0"]
    assert c["samples"] == 100 * 400 and c["kurtosis"].item() == pytest.approx(3.0, abs=0.15)


def test_checkpoint_pair_decomposition():
    g = torch.Generator().manual_seed(0)
    w_adv = torch.randn(10, 20, generator=g)
    v = torch.randn(10, 20, generator=g)
    v -= (v * w_adv).sum(1, keepdim=True) / (w_adv * w_adv).sum(1, keepdim=True) * w_adv  # v ⟂ w′ per unit
    v *= 0.1
    w_clean = 2 * w_adv + v
    out = checkpoint_pair(w_clean, w_adv)
    assert out["beta"]["median"] == pytest.approx(2.0, abs=1e-6)
    assert out["fraction_beta_dominant"] == 1.0
    assert out["v_over_w"]["median"] < 0.2
    out = checkpoint_pair(w_adv * 0.01 + v * 10, w_adv)  # mostly the orthogonal part
    assert out["fraction_beta_dominant"] == 0.0
    rank1 = checkpoint_pair(w_adv, w_adv + torch.outer(torch.ones(10), torch.ones(20)))
    assert rank1["stable_rank_change"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        checkpoint_pair(w_adv, w_adv[:, :5])


def test_patches_follow_the_layers_weight_order():
    conv = nn.Conv2d(2, 3, 3, bias=False)
    model = nn.Sequential(conv)
    x = torch.rand(4, 2, 6, 6)
    patches = layer_input_patches(model, "0", x, n_patches=10 ** 6)
    assert patches.shape == (4 * 16, 18)
    out = model(x).detach().permute(0, 2, 3, 1).reshape(-1, 3)  # positions in unfold order
    assert torch.allclose(patches @ layer_units(conv).T, out, atol=1e-5)
    white = whitened_random_basis(patches, seed=0).atoms
    cov = torch.cov(patches.T.double())
    assert torch.allclose((white.double() @ white.double().T), cov, atol=1e-4)  # C^½ Q Qᵀ C^½ = C


def test_layer_lookup_and_next_layer_weights():
    model = sparse_coding_mlp(d=8, hidden=5)
    with torch.no_grad():
        model.fc2.weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 3.0, 0.5]]))
    assert next_layer_weights(model, "fc1").tolist() == pytest.approx([1.0, 2.0, 0.0, 3.0, 0.5])
    assert next_layer_weights(model, "fc2") is None
    with pytest.raises(ValueError, match="fc1"):
        get_layer(model, "conv1")


def test_synthetic_task_spec_and_pixels():
    task = parse_synthetic_spec("synthetic:d=12,k=2,seed=3,n_train=50,noise=0.02")
    assert (task.d, task.k, task.seed, task.n_train, task.noise) == (12, 2, 3, 50, 0.02)
    assert parse_synthetic_spec(task.spec()) == task
    assert parse_synthetic_spec("mnist") is None
    with pytest.raises(ValueError, match="keys"):
        parse_synthetic_spec("synthetic:dim=3")
    p, y = task.tensors("train")
    x, z, y2 = task.features("train")
    assert p.shape == (50, 1, 1, 12) and 0 <= p.min() and p.max() <= 1 and torch.equal(y, y2)
    assert ((z != 0).sum(1) == 2).all()
    assert torch.allclose(sparse_coding_mlp(d=12)[0](p), x, atol=1e-5)  # the model sees the features
    assert not torch.equal(task.with_labels(1).features("train")[2], y)  # another label function
    assert torch.equal(task.with_labels(1).features("train")[0], x)


def test_report_on_a_zoo_model_learns_an_ica_basis():
    import robust_surgery as rs

    model = rs.load_model("zoo:mnist-lenet")
    report = purification_report(model, "mnist", "conv1", basis="ica", n=200, n_patches=4000)
    names = [s.basis for s in report.scores]
    assert names == ["ica", "random-white", "random"]
    assert (report.units, report.fan_in) == (10, 25)
    d = report.to_dict()
    assert 1 <= d["purity"]["ica"]["pr"]["mean"] <= 25
    assert d["diagnostics"]["kurtosis"]["mean"] > 3  # first-layer responses to digits are heavy-tailed
    assert "weighted_mean" in d["purity"]["ica"]["pr"]  # conv2 reads conv1's channels
    with pytest.raises(ValueError, match="synthetic"):
        purification_report(model, "mnist", "conv1", basis="true", n=50)
    assert math.isfinite(d["purity"]["random"]["hoyer"]["mean"])


def test_purification_plots_write_pngs(tmp_path):
    from robust_surgery.purification.diagnostics import plot_filters, plot_purity_vs_eps

    png = b"\x89PNG\r\n\x1a\n"
    f = plot_filters({"conv": torch.nn.Conv2d(3, 8, 5), "linear": torch.nn.Linear(25, 4)}, tmp_path / "f.png")
    c = plot_purity_vs_eps({"ica": [(0.0, 3.0), (0.1, 2.0)]}, tmp_path / "c.png", reference=2.5)
    assert f.read_bytes()[:8] == png and c.read_bytes()[:8] == png and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="rows must be square images"):
        plot_filters({"bad": torch.nn.Linear(24, 4)}, tmp_path / "bad.png")
