"""Fast NRPM (issue 5): analytic chunked backward, conv row blocks, layouts, memory, fallbacks.

Everything is compared with the direct reference (tests/nrpm_reference.py): float64 to 1e-6
relative, float32 to 1e-4. The correctness tests run twice (fixture ``path``): through the fused
C kernels (robust_surgery/nn/backends/c.py, the CPU default) and through the eager chunks.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import nrpm_reference as ref
from robust_surgery.nn import NRPMConv1d, NRPMConv2d, NRPMConv3d, NRPMLinear, NRPMSettings
from robust_surgery.nn import functional as Fn
from robust_surgery.nn.backends import c as cpu_kernels, eager as kernels

KIB = 1024
NORMS = ["L1", "MCP", "Huber", "HM", "L2"]


@pytest.fixture(params=["fused", "eager"])
def path(request, monkeypatch):
    """Run the test through the fused C kernels or the eager chunks (and check the right one ran)."""
    fused = request.param == "fused"
    monkeypatch.setattr(cpu_kernels.switch, "value", fused)
    if fused:
        assert cpu_kernels.library() is not None, f"the C kernel did not build: {cpu_kernels._build_error}"
    before = dict(cpu_kernels.calls)
    yield request.param
    if not fused:  # (that the fused path dispatches is checked in test_nrpm_cpu_kernel.py)
        assert cpu_kernels.calls == before


@pytest.fixture
def eager(monkeypatch):
    """The eager chunked path only (tests of its chunking, compile option and memory budget)."""
    monkeypatch.setattr(cpu_kernels.switch, "value", False)


def _settings(norm, K):
    # γ, δ at the scale of the random terms, so that MCP/Huber/HM take both clamp branches.
    return NRPMSettings(norm=norm, K=K, eps=1e-3, gamma=0.4, delta=0.3)


def _close(got, want, rtol=1e-6):
    for a, b in zip(got, want):
        a, b = a.detach(), b.detach()
        scale = b.abs().max().clamp_min(1e-30)
        assert float((a - b).abs().max() / scale) <= rtol, (float((a - b).abs().max() / scale), a, b)


def _grads(out, params):
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    return (out,) + torch.autograd.grad(out, params, g)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_linear_forward_and_gradients_match_direct(norm, K, lam, path):
    torch.manual_seed(0)
    dense = nn.Linear(37, 11).double()
    layer = NRPMLinear.from_dense(dense, _settings(norm, K), lam=lam, memory_budget=8 * KIB)  # many chunks
    x = torch.randn(2, 5, 37, dtype=torch.float64, requires_grad=True)
    params = (x, dense.weight, dense.bias, layer.lam_logit)
    ours = _grads(layer(x), params[:3])
    lam_t = torch.sigmoid(layer.lam_logit)
    theirs = _grads(ref.linear(x.reshape(-1, 37), dense.weight, dense.bias, lam_t, K, norm, 1e-3, 0.4, 0.3).reshape(2, 5, 11),
                    params[:3])
    _close(ours, theirs)
    if 0 < lam < 1 and norm != "L2":  # λ's gradient (λ = 0: saturated sigmoid; L2: the dense layer)
        g_ours = torch.autograd.grad(layer(x).square().sum(), layer.lam_logit)
        g_ref = torch.autograd.grad(ref.linear(x.reshape(-1, 37), dense.weight, dense.bias, lam_t, K, norm, 1e-3, 0.4, 0.3)
                                    .square().sum(), layer.lam_logit)
        _close(g_ours, g_ref)


CONV_CASES = [
    # (dims, in, out, kernel, stride, padding, dilation, groups, padding_mode, spatial)
    (2, 8, 6, 3, 1, 1, 1, 1, "zeros", (6, 7)),  # D = 72: "D last" layout
    (2, 4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, "replicate", (8, 7)),  # rect, stride, dilation, groups
    (2, 6, 6, 3, 1, 1, 1, 6, "zeros", (7, 6)),  # depthwise: "D first" layout
    (2, 4, 8, 3, 2, 1, 2, 4, "circular", (7, 7)),  # depthwise, multiplier 2, stride, dilation
    (2, 3, 4, 2, 1, "same", 2, 1, "reflect", (6, 5)),
    (1, 6, 4, 5, 2, 2, 1, 2, "zeros", (13,)),  # D = 15
    (1, 4, 4, 3, 1, "same", 3, 4, "reflect", (11,)),
    (3, 2, 4, (2, 3, 2), (1, 2, 1), 1, 1, 2, "zeros", (3, 5, 3)),
]


def _reference_conv(conv, x, lam, K, norm):
    rev = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = torch.nn.functional.pad(x, list(rev), mode=mode)
    n = len(conv.kernel_size)
    return ref.conv(xp, conv.weight, conv.bias, lam, K, norm, 1e-3, conv.stride, (0,) * n, conv.dilation,
                    conv.groups, gamma=0.4, delta=0.3)


def _conv_pair(case, norm, K, lam, dtype=torch.float64, budget=6 * KIB):
    dims, cin, cout, k, s, p, d, g, mode, spatial = case
    dense = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](cin, cout, k, s, p, d, g, True, mode).to(dtype)
    layer = (NRPMConv1d, NRPMConv2d, NRPMConv3d)[dims - 1].from_dense(dense, _settings(norm, K), lam=lam,
                                                                     memory_budget=budget)
    return dense, layer


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-c{c[1]}-g{c[7]}-s{c[4]}-d{c[6]}-{c[8]}")
def test_conv_forward_and_gradients_match_direct(case, path):
    torch.manual_seed(1)
    for norm, K, lam in (("L1", 3, 0.3), ("HM", 1, 0.0), ("MCP", 1, 0.3), ("Huber", 3, 0.0)):
        dense, layer = _conv_pair(case, norm, K, lam)
        x = torch.randn(3, case[1], *case[9], dtype=torch.float64, requires_grad=True)
        params = (x, dense.weight, dense.bias, layer.lam_logit)
        ours = _grads(layer(x), params)
        lam_t = torch.sigmoid(layer.lam_logit)
        theirs = _grads(_reference_conv(dense, x, lam_t, K, norm), params)
        _close(ours, theirs)


def test_conv_row_blocks_and_chunks_agree_with_one_chunk(path):
    """Tiny budget: one batch item unfolded at a time, many row and output chunks; huge budget: one."""
    torch.manual_seed(2)
    case = CONV_CASES[0]
    dense, small = _conv_pair(case, "L1", 2, 0.3, budget=1)
    big = NRPMConv2d.from_dense(dense, _settings("L1", 2), lam=0.3, memory_budget=1 << 30)
    x = torch.randn(4, 8, 6, 7, dtype=torch.float64, requires_grad=True)
    params = (x, dense.weight, dense.bias)
    _close(_grads(small(x), params), _grads(big(x), params), rtol=1e-12)


def test_float32_agrees_with_float64_direct(path):
    torch.manual_seed(3)
    dense, layer = _conv_pair(CONV_CASES[0], "L1", 3, 0.3, dtype=torch.float32, budget=64 * KIB)
    x = torch.randn(2, 8, 6, 7, requires_grad=True)
    ours = _grads(layer(x), (x, dense.weight, dense.bias))
    d64 = (nn.Conv2d(8, 6, 3, padding=1)).double()
    d64.load_state_dict(dense.state_dict())
    x64 = x.detach().double().requires_grad_(True)
    theirs = _grads(_reference_conv(d64, x64, 0.3, 3, "L1"),
                    (x64, d64.weight, d64.bias))
    _close([t.double() for t in ours], theirs, rtol=1e-4)
    lin = nn.Linear(300, 20)
    nl = NRPMLinear.from_dense(lin, NRPMSettings("L1", 3, 1e-3), lam=0.3)
    xl = torch.randn(16, 300, requires_grad=True)
    ours = _grads(nl(xl), (xl, lin.weight))
    xl64 = xl.detach().double().requires_grad_(True)
    w64 = lin.weight.detach().double().requires_grad_(True)
    theirs = _grads(ref.linear(xl64, w64, lin.bias.double(), 0.3, 3, "L1", 1e-3), (xl64, w64))
    _close([t.double() for t in ours], theirs, rtol=1e-4)


@pytest.mark.parametrize("norm", ["L1", "MCP", "Huber", "HM", "L2"])
def test_reweight_derivatives_equal_autograd(norm):
    s = NRPMSettings(norm=norm, K=1, eps=1e-3, gamma=0.4, delta=0.3)
    dist = torch.cat([torch.linspace(0, 3, 2001, dtype=torch.float64), torch.tensor([0.3 - 1e-3, 2.5 - 1e-3], dtype=torch.float64)])
    dist.requires_grad_(True)
    (want,) = torch.autograd.grad((s.reweight()(dist) + 0 * dist).sum(), dist)
    torch.testing.assert_close(s.reweight_derivative()(dist.detach()), want, rtol=1e-12, atol=1e-12)


def test_custom_reweight_without_derivative_falls_back_to_autograd():
    @Fn.register_reweight("cauchy-fast-test")
    def cauchy(dist, *, eps, gamma, delta):
        return 1.0 / (1.0 + (dist / gamma) ** 2)

    try:
        s = NRPMSettings("cauchy-fast-test", 2, gamma=0.5)
        assert s.reweight_derivative() is None
        torch.manual_seed(0)
        x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
        got = _grads(Fn.nrpm_linear(x, w, None, 0.2, s, memory_budget=KIB), (x, w))

        def direct(x, w):
            u = x.unsqueeze(1) * w.unsqueeze(0)
            z0 = z = u.sum(-1)
            for _ in range(2):
                wt = cauchy((u - z.unsqueeze(-1) / 9).abs(), eps=0, gamma=0.5, delta=0)
                z = 9 * (wt * u).sum(-1) / wt.sum(-1)
            return 0.2 * z0 + 0.8 * z

        _close(got, _grads(direct(x, w), (x, w)))

        @Fn.register_reweight_derivative("cauchy-fast-test")
        def dcauchy(dist, *, eps, gamma, delta):
            return -2 * dist / gamma**2 / (1.0 + (dist / gamma) ** 2) ** 2

        assert s.reweight_derivative() is not None
        _close(_grads(Fn.nrpm_linear(x, w, None, 0.2, s, memory_budget=KIB), (x, w)), got, rtol=1e-10)
    finally:
        Fn.REWEIGHTS.pop("cauchy-fast-test")
        Fn.REWEIGHT_DERIVATIVES.pop("cauchy-fast-test", None)


def test_register_reweight_with_derivative_argument():
    def sq(dist, *, eps, gamma, delta):
        return 1.0 / (dist + eps) ** 2

    def dsq(dist, *, eps, gamma, delta):
        return -2.0 / (dist + eps) ** 3

    Fn.register_reweight("sq-fast-test", derivative=dsq)(sq)
    try:
        assert NRPMSettings("sq-fast-test").reweight_derivative() is not None
    finally:
        Fn.REWEIGHTS.pop("sq-fast-test")
        Fn.REWEIGHT_DERIVATIVES.pop("sq-fast-test", None)


def test_saves_only_inputs_and_small_iterates(path):
    """Autograd keeps x, w, z0 and the K per-output iterates and sums (2K x output size); nothing per term."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 50, requires_grad=True)
    w = torch.randn(1, 30, 50, requires_grad=True)
    z0 = torch.einsum("grd,god->gro", x, w)
    K = 3
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = Fn.robust_pattern_match(x, w, z0.detach().requires_grad_(), NRPMSettings("L1", K), memory_budget=64 * KIB)
    assert sum(saved) <= x.numel() + w.numel() + z0.numel() + 2 * K * out.numel()
    assert max(saved) < 64 * 30 * 50  # no term-sized tensor
    with torch.no_grad():
        y = Fn.robust_pattern_match(x, w, z0, NRPMSettings("L1", K))
    assert y.grad_fn is None


def test_skips_work_that_cannot_matter():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    w = torch.randn(4, 5)
    b = torch.randn(4)
    lin = torch.nn.functional.linear(x, w, b)
    assert torch.equal(Fn.nrpm_linear(x, w, b, 1.0, NRPMSettings("L1", 3)), lin)
    assert torch.equal(Fn.nrpm_linear(x, w, b, 0.3, NRPMSettings("L2", 3)), lin)
    assert torch.equal(Fn.nrpm_linear(x, w, b, 0.3, NRPMSettings("L1", 0)), lin)
    z = torch.randn(2, 2)
    assert Fn.mix(0.0, torch.randn(2, 2), z) is z  # a number: skipped
    assert torch.equal(Fn.mix(torch.tensor(0.0), torch.randn(2, 2), z), z)  # a tensor's value is never read


def test_forward_never_reads_a_tensor_value_meta_device_and_export():
    """λ == 1 / 0 are cached as Python bools where λ is set, so forward runs on the meta device and
    torch.export traces a converted network at λ = 1 (the dense path) with the eager numbers."""
    import robust_surgery as rs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    conv = rs.convert(net, paradigm=1, norm="L1", K=2, lam=0.5)
    meta = conv.to("meta")
    assert meta(torch.empty(2, 1, 8, 8, device="meta")).shape == (2, 3)
    conv = rs.convert(net, paradigm=1, norm="L1", K=2, lam=1.0)
    x = torch.rand(2, 1, 8, 8)
    exported = torch.export.export(conv, (x,))
    assert torch.equal(exported.module()(x), conv(x)) and torch.equal(conv(x), net(x))
    state = conv.state_dict()
    other = rs.convert(net, paradigm=1, norm="L1", K=2, lam=0.5)
    other.load_state_dict(state)  # loading λ = 1 switches the cached flag too
    assert all(m._lam_is_one for _, m in rs.nrpm_layers(other)) and torch.equal(other(x), net(x))


def test_compile_failure_falls_back_to_eager(monkeypatch, eager):
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    want = _grads(Fn.nrpm_linear(x, w, None, 0.3, NRPMSettings("L1", 2)), (x, w))

    def broken(fn, **kw):
        def fail(*a):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    kernels.use_compile(True)
    try:
        with pytest.warns(RuntimeWarning, match="running eagerly"):
            got = _grads(Fn.nrpm_linear(x, w, None, 0.3, NRPMSettings("L1", 2)), (x, w))
        _close(got, want, rtol=1e-12)
        assert not kernels.compile_enabled()
    finally:
        kernels.compile_switch.set(None)


@pytest.mark.slow
def test_compiled_path_matches_eager(eager):
    """torch.compile (inductor C++) of the chunk functions: same numbers. Slow (compilation)."""
    torch.manual_seed(0)
    conv = NRPMConv2d(8, 8, 3, padding=1, settings=NRPMSettings("L1", 3), lam=0.3)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    want = _grads(conv(x), (x, conv.weight, conv.bias))
    kernels.use_compile(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile would fall back to eager silently
            got = _grads(conv(x), (x, conv.weight, conv.bias))
        assert kernels.compile_enabled()  # still on: the compiled chunks ran
    finally:
        kernels.compile_switch.set(None)
    _close(got, want, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_peak_memory_stays_under_budget(fused):
    """A 64→64 3×3 conv (2×16×16, K=3) under a 16 MiB budget: the process grows by about the budget.

    Eager: the chunks' term tensors; fused: only the unfolded input block and the gradients.
    Fresh process; growth of its resident high-water mark (VmHWM) over the resident size after
    setup, against the budget plus what must exist anyway (inputs, outputs, gradients, iterates).
    """
    code = textwrap.dedent(
        """
        import torch
        from robust_surgery.nn import NRPMConv2d, NRPMSettings
        from robust_surgery.nn.backends import use_backend
        use_backend("c", FUSED)
        def vm(f):
            return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f + ":")][0]
        torch.manual_seed(0)
        torch.set_num_threads(1)
        budget = 16 * 2**20
        conv = NRPMConv2d(64, 64, 3, padding=1, settings=NRPMSettings("L1", 3), lam=0.5, memory_budget=budget)
        x = torch.rand(2, 64, 16, 16, requires_grad=True)
        conv(x[:1, :, :4, :4]).sum().backward()  # warm up allocator / kernels
        base = vm("VmRSS")
        conv(x).square().sum().backward()
        print(vm("VmHWM") - base, budget)
        """
    )
    code = code.replace("FUSED", str(fused))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    growth, budget = map(int, out.stdout.split()[-2:])
    # the direct method would need 2·64·576·256 · 4 B · (K + 1) ≈ 300 MB; fixed tensors here are < 4 MB,
    # but the first full-size pass also maps code pages and sets up kernels: measured 9–16 MiB of
    # growth in a long-lived checkout and up to 28.3 MiB in a fresh CI clone (2026-12-02)
    assert growth < budget + 20 * 2**20, f"grew {growth / 2**20:.1f} MiB for a {budget / 2**20:.0f} MiB budget"
