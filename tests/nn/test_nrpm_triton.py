"""Fused Triton NRPM kernels (issue 5, item 4), verified in Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
robust_surgery.nn.backends.triton is imported; another test (or torch itself) may have imported
it already in this process. So the checks run once, in a child process started with
TRITON_INTERPRET=1, through the real dispatch (backends.run sends CPU tensors to the kernels in
interpreter mode), and report their errors against the direct reference (tests/nrpm_reference.py)
as JSON; the tests here assert on that report. float64 to 1e-6 relative, float32 to 1e-4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from robust_surgery.nn import NRPMConv2d, NRPMLinear, NRPMSettings
from robust_surgery.nn import backends
from robust_surgery.nn.backends import eager, triton as tk
from robust_surgery.nn import functional as Fn

HERE = Path(__file__).resolve().parents[1]  # tests/: nrpm_reference.py
LINEAR_CASES = [(norm, K, lam) for norm in ("L1", "MCP", "Huber", "HM") for K, lam in ((1, 0.0), (3, 0.3))]
CONV_IDS = [0, 1, 2, 5, 7]  # indices into test_nrpm_fast.CONV_CASES: D-last, groups/stride/dilation, depthwise, 1d, 3d
# (norm, K, λ) per conv case: two each, alternating, so every norm runs on several conv geometries
# (the norms' arithmetic is shared by all shapes and runs in full on the Linear cases above)
CONV_SETTINGS = ((("L1", 3, 0.3), ("HM", 1, 0.0)), (("MCP", 2, 0.3), ("Huber", 3, 0.0)))


def _conv_settings(i: int):
    return CONV_SETTINGS[CONV_IDS.index(i) % 2]


# --------------------------------------------------------------------------------------------
# Child: runs under TRITON_INTERPRET=1 and prints {check: relative error or value}
# --------------------------------------------------------------------------------------------
def _rel(got, want) -> float:
    """Largest |got - want| over the largest |want|, across a sequence of tensors."""
    return max(float((a.detach().double() - b.detach().double()).abs().max() / b.detach().abs().max().clamp_min(1e-30))
               for a, b in zip(got, want))


def _child() -> dict:
    import nrpm_reference as ref
    from test_nrpm_fast import CONV_CASES, _conv_pair, _grads, _reference_conv, _settings

    assert tk.interpreted(), "child must run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    report = {}

    def launched(fn):
        before = dict(tk.calls)
        out = fn()
        return out, {k: tk.calls[k] - before[k] for k in before}

    for norm, K, lam in LINEAR_CASES:  # Linear, float64, every gradient (λ's too)
        torch.manual_seed(0)
        dense = torch.nn.Linear(37, 11).double()
        layer = NRPMLinear.from_dense(dense, _settings(norm, K), lam=0.3 if lam else 0.0)
        x = torch.randn(2, 5, 37, dtype=torch.float64, requires_grad=True)
        params = (x, dense.weight, dense.bias) + ((layer.lam_logit,) if lam else ())
        ours, n = launched(lambda: _grads(layer(x), params))
        want = ref.linear(x.reshape(-1, 37), dense.weight, dense.bias, layer.lam, K, norm, 1e-3, 0.4, 0.3)
        report[f"linear-{norm}-K{K}-lam{lam}"] = {"rel": _rel(ours, _grads(want.reshape(2, 5, 11), params)), **n}

    torch.manual_seed(0)  # L2 never reaches the kernel through a layer (it is the linear layer): call it directly
    x, w = torch.randn(1, 9, 21, dtype=torch.float64, requires_grad=True), torch.randn(1, 6, 21, dtype=torch.float64)
    z0 = torch.einsum("grd,god->gro", x, w).detach().requires_grad_(True)
    w.requires_grad_(True)
    ours, n = launched(lambda: _grads(Fn.robust_pattern_match(x, w, z0, _settings("L2", 2)), (x, w, z0)))
    backends.use_backend("triton", False)
    eager = _grads(Fn.robust_pattern_match(x, w, z0, _settings("L2", 2)), (x, w, z0))
    backends.use_backend("triton", True)
    report["direct-L2-K2"] = {"rel": _rel(ours, eager), **n}

    for i in CONV_IDS:  # Conv, float64, x / weight / bias / λ gradients
        case = CONV_CASES[i]
        torch.manual_seed(1)
        for norm, K, lam in _conv_settings(i):
            dense, layer = _conv_pair(case, norm, K, lam)
            x = torch.randn(2, case[1], *case[9], dtype=torch.float64, requires_grad=True)
            params = (x, dense.weight, dense.bias, layer.lam_logit)
            ours, n = launched(lambda: _grads(layer(x), params))
            theirs = _grads(_reference_conv(dense, x, layer.lam, K, norm), params)
            report[f"conv{i}-{norm}-K{K}-lam{lam}"] = {"rel": _rel(ours, theirs), **n}

    torch.manual_seed(3)  # float32 against the float64 reference
    d32 = torch.nn.Conv2d(8, 6, 3, padding=1)
    c32 = NRPMConv2d.from_dense(d32, NRPMSettings("L1", 3, 1e-3), lam=0.3)
    x32 = torch.randn(2, 8, 6, 7, requires_grad=True)
    ours, n = launched(lambda: _grads(c32(x32), (x32, d32.weight, d32.bias)))
    d64 = torch.nn.Conv2d(8, 6, 3, padding=1).double()
    d64.load_state_dict(d32.state_dict())
    x64 = x32.detach().double().requires_grad_(True)
    theirs = _grads(_reference_conv(d64, x64, 0.3, 3, "L1"), (x64, d64.weight, d64.bias))
    report["conv-float32"] = {"rel": _rel(ours, theirs), **n}

    with torch.no_grad():  # inference: the forward kernel without saving iterates
        y, n = launched(lambda: c32(x32))
    report["no-grad"] = {"rel": _rel([y], [ours[0]]), **n}

    @Fn.register_reweight("cauchy-triton-test")  # a custom norm: the eager path, no launch
    def cauchy(dist, *, eps, gamma, delta):
        return 1.0 / (1.0 + (dist / gamma) ** 2)

    custom = NRPMLinear.from_dense(torch.nn.Linear(7, 3), NRPMSettings("cauchy-triton-test", 2, gamma=0.5), lam=0.2)
    _, n = launched(lambda: custom(torch.randn(4, 7)).sum().backward())
    report["custom-norm"] = n

    Fn.register_reweight("L1")(lambda dist, *, eps, gamma, delta: 1.0 / (dist + eps))  # re-registered L1: eager
    try:
        lin = NRPMLinear.from_dense(torch.nn.Linear(7, 3), NRPMSettings("L1", 2), lam=0.2)
        _, n = launched(lambda: lin(torch.randn(4, 7)))
        report["reregistered-L1"] = n
    finally:
        Fn.register_reweight("L1", derivative=Fn._dreweight_l1)(Fn._reweight_l1)

    def broken(*args, **kw):  # a kernel that fails: warn, switch off, same numbers from the eager path
        raise RuntimeError("no GPU toolchain here")

    torch.manual_seed(5)
    lin = NRPMLinear.from_dense(torch.nn.Linear(9, 4).double(), NRPMSettings("MCP", 2, gamma=0.4), lam=0.3)
    xb = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    want = _grads(lin(xb), (xb, lin.weight))
    tk.backward, real_backward = broken, tk.backward
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _grads(lin(xb), (xb, lin.weight))  # forward fused, backward falls back
            report["failing-backward"] = {"rel": _rel(got, want), "warned": any("Triton" in str(c.message) for c in caught),
                                          "enabled_after": tk.enabled()}
        backends.use_backend("triton", True)
        tk.forward = broken
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _grads(lin(xb), (xb, lin.weight))
            report["failing-forward"] = {"rel": _rel(got, want), "warned": any("Triton" in str(c.message) for c in caught),
                                         "enabled_after": tk.enabled()}
    finally:
        tk.backward = real_backward
    return report


@pytest.fixture(scope="module")
def interpreted_report() -> dict:
    pytest.importorskip("triton")  # the interpreter checks need Triton; the other tests here do not
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("ROBUST_SURGERY_NRPM_TRITON", None)
    out = subprocess.run([sys.executable, str(Path(__file__)), "--child"], capture_output=True, text=True, env=env,
                         timeout=600, cwd=HERE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Tests on the child's report
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,K,lam", LINEAR_CASES)
def test_linear_forward_and_gradients_match_direct(interpreted_report, norm, K, lam):
    r = interpreted_report[f"linear-{norm}-K{K}-lam{lam}"]
    assert r["forward"] == 1 and r["backward"] == 1  # the fused kernels ran (one row block)
    assert r["rel"] <= 1e-6, r


def test_l2_kernel_matches_eager(interpreted_report):
    r = interpreted_report["direct-L2-K2"]
    assert r["forward"] == 1 and r["backward"] == 1
    assert r["rel"] <= 1e-12, r


@pytest.mark.parametrize("i", CONV_IDS)
def test_conv_forward_and_gradients_match_direct(interpreted_report, i):
    keys = [f"conv{i}-{norm}-K{K}-lam{lam}" for norm, K, lam in _conv_settings(i)]
    for key in keys:
        r = interpreted_report[key]
        assert r["forward"] >= 1 and r["backward"] >= 1, (key, r)
        assert r["rel"] <= 1e-6, (key, r)


def test_float32_matches_float64_direct(interpreted_report):
    r = interpreted_report["conv-float32"]
    assert r["forward"] >= 1 and r["backward"] >= 1
    assert r["rel"] <= 1e-4, r


def test_inference_runs_forward_kernel_only(interpreted_report):
    r = interpreted_report["no-grad"]
    assert r["forward"] >= 1 and r["backward"] == 0
    assert r["rel"] <= 1e-6, r


def test_unsupported_norms_take_the_eager_path(interpreted_report):
    assert interpreted_report["custom-norm"] == {"forward": 0, "backward": 0}
    assert interpreted_report["reregistered-L1"] == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("which", ["failing-backward", "failing-forward"])
def test_failing_kernel_falls_back_to_eager_with_a_warning(interpreted_report, which):
    r = interpreted_report[which]
    assert r["warned"] and not r["enabled_after"], r
    assert r["rel"] <= 1e-12, r


def test_cpu_without_interpreter_or_triton_is_not_sent_to_triton(monkeypatch):
    x, w = torch.randn(1, 4, 5), torch.randn(1, 3, 5)
    z0 = torch.einsum("grd,god->gro", x, w)
    s = NRPMSettings("L1", 2)
    if not tk.interpreted():
        assert not tk.supports(s, x, w, z0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select_backend(s, x, w, z0) is not tk  # the C kernels (or eager) take CPU tensors
    monkeypatch.setattr(tk, "triton", None)  # no Triton: even in interpreter mode nothing goes there
    assert not tk.supports(s, x, w, z0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select_backend(s, x, w, z0) is eager


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setattr(tk.switch, "value", None)
    monkeypatch.setenv("ROBUST_SURGERY_NRPM_TRITON", "0")
    assert not tk.enabled()
    monkeypatch.setenv("ROBUST_SURGERY_NRPM_TRITON", "1")
    assert tk.enabled()


def test_custom_norm_backward_when_the_input_needs_no_gradient():
    """The autograd fallback (a norm without derivative) differentiates only what needs it (eager path)."""
    @Fn.register_reweight("cauchy-frozen-input-test")
    def cauchy(dist, *, eps, gamma, delta):
        return 1.0 / (1.0 + (dist / gamma) ** 2)

    try:
        torch.manual_seed(0)
        lin = NRPMLinear.from_dense(torch.nn.Linear(7, 3).double(), NRPMSettings("cauchy-frozen-input-test", 2, gamma=0.5),
                                    lam=0.2)
        x = torch.randn(4, 7, dtype=torch.float64)  # no requires_grad: the network's input
        (got,) = torch.autograd.grad(lin(x).square().sum(), lin.weight)
        w = lin.weight.detach().requires_grad_(True)
        u = x.unsqueeze(1) * w.unsqueeze(0)
        z0 = z = u.sum(-1)
        for _ in range(2):
            wt = cauchy((u - z.unsqueeze(-1) / 7).abs(), eps=0, gamma=0.5, delta=0)
            z = 7 * (wt * u).sum(-1) / wt.sum(-1)
        (want,) = torch.autograd.grad((0.2 * z0 + 0.8 * z + lin.bias).square().sum(), w)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    finally:
        Fn.REWEIGHTS.pop("cauchy-frozen-input-test")
        Fn.REWEIGHT_DERIVATIVES.pop("cauchy-frozen-input-test", None)


if __name__ == "__main__" and "--child" in sys.argv:
    print(json.dumps(_child()))
