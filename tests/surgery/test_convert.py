"""The converter: selection, overrides, errors, unconvert, registries, real architectures."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import robust_surgery as rs
from robust_surgery.nn import NRPMLayer


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _names(model):
    return [n for n, m in model.named_modules() if isinstance(m, NRPMLayer)]


def test_convert_all_is_not_inplace_by_default():
    m = _mlp()
    c = rs.convert(m, lam=0.3, K=2)
    assert _names(c) == ["0", "2", "4"]
    assert _names(m) == []  # original untouched
    assert all(abs(l.lam_value - 0.3) < 1e-6 and l.settings.K == 2 for _, l in rs.nrpm_layers(c))
    x = torch.randn(5, 8)
    assert not torch.allclose(c(x), m(x))


def test_inplace_conversion_shares_weights():
    m = _mlp()
    w = m[0].weight
    c = rs.convert(m, inplace=True)
    assert c is m and m[0].weight is w


@pytest.mark.parametrize("include,want", [
    ("2", ["2"]),
    (["0", "4"], ["0", "4"]),
    ("*", ["0", "2", "4"]),
    ("re:[02]", ["0", "2"]),
])
def test_include_by_exact_glob_and_regex(include, want):
    assert _names(rs.convert(_mlp(), include=include)) == want


def test_exclude_and_filter_fn():
    assert _names(rs.convert(_mlp(), exclude="4")) == ["0", "2"]
    c = rs.convert(_mlp(), filter_fn=lambda mod, fqn: mod.out_features == 16)
    assert _names(c) == ["0", "2"]


def test_overrides_exact_beats_pattern_and_none_skips():
    c = rs.convert(_mlp(), lam=0.5, overrides={"re:.*": {"K": 1}, "2": {"lam": 1.0, "norm": "MCP"}, "4": None})
    assert _names(c) == ["0", "2"]
    assert c[0].settings.K == 1 and c[0].lam_value == pytest.approx(0.5)
    assert c[2].settings.norm == "MCP" and c[2].lam_value == 1.0 and c[2].settings.K == 3
    with pytest.raises(ValueError, match="unknown keys"):
        rs.convert(_mlp(), overrides={"0": {"lamda": 0.2}})


def test_nothing_matched_is_a_clear_error():
    with pytest.raises(rs.NoLayerMatchedError, match=r"no layer was selected with include=\['fc9'\].*Convertible layers in this model: 0, 2, 4"):
        rs.convert(_mlp(), include="fc9")
    with pytest.raises(rs.NoLayerMatchedError, match="no layer of a convertible type"):
        rs.convert(nn.Sequential(nn.ReLU()))
    with pytest.warns(UserWarning, match="'fc9' matched no layer"):
        rs.convert(_mlp(), include=["fc9", "0"])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"lam .* must be in \[0, 1\]"):
        rs.convert(_mlp(), lam=2)
    with pytest.raises(ValueError, match="paradigm must be 1, 2 or 3"):
        rs.convert(_mlp(), paradigm=4)
    with pytest.raises(ValueError, match="unknown norm"):
        rs.convert(_mlp(), norm="l1")


def test_paradigms_set_trainable_parameters():
    c2 = rs.convert(_mlp(), paradigm=2)
    assert {n for n, p in c2.named_parameters() if p.requires_grad} == {"0.lam_logit", "2.lam_logit", "4.lam_logit"}
    c3 = rs.convert(_mlp(), paradigm=3)
    assert all(p.requires_grad for p in c3.parameters())


def test_unconvert_restores_plain_layers_and_outputs():
    m = _mlp()
    c = rs.convert(m, lam=0.2)
    u = rs.unconvert(c)
    assert [type(x) for x in u] == [type(x) for x in m]
    assert "lam_logit" not in str(list(u.state_dict()))
    x = torch.randn(4, 8)
    assert torch.equal(u(x), m(x))
    assert _names(c) == ["0", "2", "4"]  # not in place by default


def test_shared_module_is_converted_once():
    lin = nn.Linear(4, 4)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    c = rs.convert(m)
    assert c[0] is c[2] and isinstance(c[0], rs.NRPMLinear)


def test_subclasses_with_their_own_forward_are_not_converted():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    m = nn.Sequential(ScaledLinear(3, 3), nn.Linear(3, 2))
    assert _names(rs.convert(m)) == ["1"]


def test_register_converter_for_a_custom_layer():
    class Bilinearish(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(5, 2)

        def forward(self, x):
            return self.inner(x)

    @rs.register_converter(Bilinearish)
    def _convert(module, cfg):
        return rs.NRPMLinear.from_dense(module.inner, cfg.settings, cfg.lam)

    try:
        m = nn.Sequential(Bilinearish())
        c = rs.convert(m, types=[Bilinearish], lam=1.0)
        assert isinstance(c[0], rs.NRPMLinear)
        x = torch.randn(3, 5)
        assert torch.equal(c(x), m(x))
    finally:
        from robust_surgery.surgery.convert import _CONVERTERS

        _CONVERTERS.pop(Bilinearish)


def test_set_lam_by_pattern():
    c = rs.convert(_mlp(), lam=0.5)
    rs.set_lam(c, 1.0, include="4")
    assert c[4].lam_value == 1.0 and c[0].lam_value == pytest.approx(0.5)


def test_torchvision_resnet18_at_lambda_one_changes_no_output():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    c = rs.convert(m, lam=1.0)
    assert len(_names(c)) == 21
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(c(x), m(x))


def test_timm_vit_tiny_at_lambda_one_changes_no_output():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    c = rs.convert(m, lam=1.0)
    assert len(_names(c)) == 50  # patch embedding conv + 4 Linear per block × 12 + head
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(c(x), m(x))


def test_converted_resnet_runs_nrpm_and_backward():
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    c = rs.convert(m, include="layer4.1.*", lam=0.5, K=1)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    c(x).sum().backward()
    assert x.grad.abs().sum() > 0 and c.layer4[1].conv1.lam_logit.grad is not None


def test_conversion_report_counts_costs():
    c = rs.convert(_mlp(), K=2, lam=0.5, overrides={"4": {"lam": 1.0}})
    rep = rs.conversion_report(c, input_shape=(8,))
    rows = {r.name: r for r in rep.layers}
    assert rows["0"].D == 8 and rows["0"].out_elements == 16
    assert rows["0"].linear_flops == 2 * 8 * 16
    assert rows["0"].nrpm_extra_flops == 8 * 16 * (1 + 7 * 2)
    assert rows["4"].nrpm_extra_flops == 0  # λ = 1 runs the plain layer
    d = rep.to_dict()
    assert d["totals"]["layers"] == 3 and d["layers"][1]["name"] == "2"
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep)
    assert "NRPM conversion" in console.export_text()


def test_cli_convert_uses_the_zoo_preset_unless_a_flag_overrides(tmp_path):
    from typer.testing import CliRunner

    from robust_surgery.cli.app import app

    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    res = runner.invoke(app, ["convert", "zoo:mnist-mlp-rs", "--K", "2", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fc1 = rs.read_manifest(out)["layers"]["fc1"]
    assert (fc1["norm"], fc1["K"], fc1["eps"], round(fc1["lam"], 6)) == ("L1", 2, 5e-5, 0.6)  # K from the flag
    assert "preset" in res.stderr and "eps=5e-05" in res.stderr
    assert rs.preset_for(rs.load_model("zoo:mnist-mlp-rs")) == {"norm": "L1", "K": 1, "eps": 5e-5, "lam": 0.6}
    assert rs.preset_for(nn.Linear(3, 3)) == {}  # not a zoo model: no preset


def test_tiny_resnet_preset_converts_only_the_block_convs():
    model = rs.convert(rs.build_arch("zoo:cifar-tiny-resnet18"), **rs.preset_for(rs.build_arch("zoo:cifar-tiny-resnet18")))
    names = [n for n, _ in rs.nrpm_layers(model)]
    assert len(names) == 16 and all(n.startswith("layer") and ".conv" in n for n in names)


def test_setting_names_and_defaults_have_one_home():
    """convert, the layers, presets, the manifest reader and the CLI all take NRPMSettings' values."""
    import dataclasses
    import inspect as pyinspect

    from robust_surgery.cli import app as cli_app
    from robust_surgery.surgery import convert as surgery, presets
    from robust_surgery.nn.functional import DEFAULT_LAM, DEFAULTS, LAYER_SETTING_NAMES, SETTING_NAMES

    assert SETTING_NAMES == ("norm", "K", "eps", "gamma", "delta") and LAYER_SETTING_NAMES[-1] == "lam"
    sig = pyinspect.signature(rs.convert).parameters
    assert {n: sig[n].default for n in LAYER_SETTING_NAMES} == {**dataclasses.asdict(DEFAULTS), "lam": DEFAULT_LAM}
    assert surgery._SETTING_KEYS == set(LAYER_SETTING_NAMES) and set(LAYER_SETTING_NAMES) <= set(presets._KEYS)
    layer = rs.convert(torch.nn.Sequential(torch.nn.Linear(3, 2)))[0]
    assert layer.settings == DEFAULTS and layer.lam_value == DEFAULT_LAM
    cli = pyinspect.signature(cli_app.convert).parameters  # the CLI keeps torch out of its import: literals, checked here
    assert (cli["gamma"].default.default, cli["delta"].default.default) == (DEFAULTS.gamma, DEFAULTS.delta)
    assert f"else {DEFAULTS.K})" in cli["K"].default.help and f"else {DEFAULT_LAM})" in cli["lam"].default.help
    assert f"else {DEFAULTS.eps:.0e}".replace("e-0", "e-") + ")" in cli["nrpm_eps"].default.help


def test_preset_resolution_and_the_meaning_of_eps_live_in_the_library():
    from robust_surgery.surgery.presets import paradigm_eps, resolve_settings

    plain = nn.Sequential(nn.Linear(4, 2))  # not a zoo model: no preset, the defaults
    settings, used = resolve_settings(plain, {"norm": None, "K": 2, "eps": None, "lam": None, "include": None})
    assert settings == {"norm": "L1", "K": 2, "eps": 1e-3, "lam": 0.5, "include": None} and used == []
    mlp = rs.load_model("zoo:mnist-mlp")  # the release's preset fills what is not given; a flag wins
    settings, used = resolve_settings(mlp, {"norm": None, "K": None, "eps": None, "lam": 0.9})
    assert settings == {**{k: rs.preset_for(mlp)[k] for k in ("norm", "K", "eps")}, "lam": 0.9}
    assert used == ["norm", "K", "eps"]
    with pytest.raises(ValueError, match="unknown convert settings"):
        resolve_settings(mlp, {"lamda": 0.5})
    assert paradigm_eps(1, 5e-5, None, None) == (5e-5, 0.2)       # paradigm 1: --eps is the reweighting ε
    assert paradigm_eps(2, 0.1, 1e-4, None) == (1e-4, 0.1)        # paradigms 2-3: the training budget
    with pytest.raises(ValueError, match="give it once"):
        paradigm_eps(3, 0.1, None, 0.2)


def test_lambda_at_exactly_0_or_1_stays_frozen_and_finite_under_weight_decay():
    """λ = 1 (logit +∞) has a zero gradient; training it only risks NaN (SGD weight decay: inf − inf)."""
    c3 = rs.convert(_mlp(), paradigm=3, lam=1.0)
    assert not any(p.requires_grad for n, p in c3.named_parameters() if n.endswith("lam_logit"))
    assert all(p.requires_grad for n, p in c3.named_parameters() if not n.endswith("lam_logit"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    tuned, history = rs.finetune(c3, (x, y), 3, adversarial=None, epochs=1, lr=0.1, weight_decay=0.1, val_n=32,
                                 batch_size=32)
    assert all(m.lam_value == 1.0 for _, m in rs.nrpm_layers(tuned)) and math.isfinite(history[0]["train_loss"])
    with pytest.raises(ValueError, match="exactly 0 or 1 cannot move"):
        rs.finetune(rs.convert(_mlp(), paradigm=2, lam=1.0), (x, y), 2, adversarial=None, val_n=32)
