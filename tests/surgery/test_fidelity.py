"""Fidelity to the original implementation on the released MNIST MLP (issue 2, item 9).

FGSM on the first 1000 MNIST test images, ε = 0 … 0.3: our converted network (norm L1, K = 1,
ε = 5e-5, λ = 0.6) must give exactly the accuracies of the direct reference computation, and
the plain network exactly the published LPM row (91.2 / 49.9 / 7.4 / 0.3 / 0 / 0 / 0).
"""
from __future__ import annotations

import pytest
import torch

import nrpm_reference as ref
from nrpm_reference import EPS, fgsm_accuracies
import robust_surgery as rs
from robust_surgery.data.datasets import load_mnist



class ReferenceMLP(torch.nn.Module):
    """The released MLP computed the direct way (every product term materialised)."""

    def __init__(self, base, lam, K, eps):
        super().__init__()
        self.layers = [(base.fc1.weight, base.fc1.bias), (base.fc2.weight, base.fc2.bias), (base.fc3.weight, base.fc3.bias)]
        self.lam, self.K, self.eps = lam, K, eps

    def forward(self, x):
        h = x.flatten(1)
        for w, b in self.layers:
            h = ref.linear(h, w, b, self.lam, self.K, "L1", self.eps)
        return h


@pytest.fixture(scope="module")
def mnist1000(shared_data):
    x, y = load_mnist("test", shared_data)
    return x[:1000], y[:1000]


@pytest.fixture(scope="module")
def released_mlp(shared_data):
    return rs.load_model("zoo:mnist-mlp", data_root=str(shared_data))


def test_plain_mlp_reproduces_published_lpm_row(released_mlp, mnist1000):
    accs = fgsm_accuracies(released_mlp, *mnist1000, EPS)
    assert accs == [91.2, 49.9, 7.4, 0.3, 0.0, 0.0, 0.0]


def test_converted_mlp_matches_direct_reference_under_fgsm(released_mlp, mnist1000):
    ours = rs.convert(released_mlp, paradigm=1, norm="L1", K=1, eps=5e-5, lam=0.6)
    reference = ReferenceMLP(released_mlp, lam=0.6, K=1, eps=5e-5)
    got = fgsm_accuracies(ours, *mnist1000, EPS)
    want = fgsm_accuracies(reference, *mnist1000, EPS)
    assert got == want
    # and NRPM buys robustness over the plain network at every ε > 0 (paper's paradigm-1 claim)
    plain = [91.2, 49.9, 7.4, 0.3, 0.0, 0.0, 0.0]
    assert all(a > b for a, b in zip(got[1:], plain[1:]))
