"""The backend interface: every backend has the same shape, one switch picks, the dispatcher falls back."""
import json

import pytest
import torch

import robust_surgery as rs
from robust_surgery.nn import backends
from robust_surgery.nn.backends import eager

INTERFACE = ("NAME", "switch", "calls", "available", "enabled", "supports", "forward", "backward", "run", "disable")


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_has_the_same_interface(name):
    b = backends.get_backend(name)
    missing = [attr for attr in INTERFACE if not hasattr(b, attr)]
    assert not missing, f"backend {name} lacks {missing}"
    assert b.NAME == name and set(b.calls) == {"forward", "backward"}


def test_unknown_backend_and_switching_eager_off_are_clear_errors():
    with pytest.raises(rs.errors.InvalidInputError, match="unknown NRPM backend 'cuda'.*eager, c, triton"):
        backends.use_backend("cuda", False)
    with pytest.raises(rs.errors.InvalidInputError, match="cannot be switched off"):
        backends.use_backend("eager", False)


def test_use_backend_switches_the_c_path_and_the_numbers_stay(monkeypatch):
    c = backends.get_backend("c")
    if not c.available():
        pytest.skip("no C compiler on this machine")
    torch.manual_seed(0)
    layer = rs.NRPMLinear(16, 8, settings=rs.NRPMSettings("L1", 3), lam=0.3).double()
    x = torch.rand(5, 16, dtype=torch.float64)
    monkeypatch.setattr(c.switch, "value", None)
    try:
        backends.use_backend("c", True)
        assert backends.select_backend(layer.settings, x[None], layer.weight[None], x[None, :, :8]) is c
        before = dict(c.calls)
        fused = layer(x)
        assert c.calls["forward"] == before["forward"] + 1
        backends.use_backend("c", False)
        assert backends.select_backend(layer.settings, x[None], layer.weight[None], x[None, :, :8]) is eager
        e_before = dict(eager.calls)
        plain = layer(x)
        assert eager.calls["forward"] > e_before["forward"] and c.calls["forward"] == before["forward"] + 1
    finally:
        backends.use_backend("c", None)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    status = backends.backend_status()
    assert list(status) == list(backends.NAMES) and status["eager"]["enabled"] is True
    json.dumps(status)  # plain data, printable as JSON


def test_a_failing_fused_backend_falls_back_to_eager_with_one_warning(monkeypatch):
    c = backends.get_backend("c")
    if not c.available():
        pytest.skip("no C compiler on this machine")
    layer = rs.NRPMLinear(12, 4, settings=rs.NRPMSettings("L1", 2), lam=0.5).double()
    x = torch.rand(3, 12, dtype=torch.float64)
    want = layer(x)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(c, "run", broken)
    monkeypatch.setattr(c.switch, "value", True)
    with pytest.warns(RuntimeWarning, match="the CPU kernel failed .*kernel launch failed"):
        got = layer(x)
    assert c.switch.value is False  # off for the rest of the process (monkeypatch restores it)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
