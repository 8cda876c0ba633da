"""Layers of real libraries: transformers' Conv1D (GPT-2), nn.MultiheadAttention (torchvision ViT),
timm's Conv2dSame and Linear, trivial subclasses; skipped and never-run layers are reported."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import robust_surgery as rs
from robust_surgery.nn.functional import nrpm_linear
from robust_surgery.nn.attention import NRPMMultiheadAttention
from robust_surgery.surgery.convert import skipped_layers


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def _types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


# ------------------------------------------------------------------ transformers
def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_convert_exactly_at_lambda_one_and_unconvert_to_conv1d_with_ties():
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8
    net = rs.convert(model, lam=1.0)
    kinds = dict(net.named_modules())
    assert all(type(kinds[n]).__name__ == "NRPMConv1D" for n in conv1d)
    assert type(net.lm_head).__name__ == "NRPMLinear" and net.lm_head.weight is net.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(net(ids).logits, want)
        net.transformer.h[0].attn.c_attn.set_lam(0.5)
        moved = net(ids).logits
    assert not torch.allclose(moved, want) and torch.isfinite(moved).all()
    back = rs.unconvert(net)
    back.transformer.h[0].attn.c_attn  # noqa: B018
    assert _types(back) == _types(model) and isinstance(back.transformer.h[0].attn.c_attn, Conv1D)
    assert back.lm_head.weight is back.transformer.wte.weight
    _same_state(back, model)


def test_nrpm_conv1d_matches_an_nrpm_linear_with_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    dense = Conv1D(6, 9).double()
    nrpm = rs.convert(nn.Sequential(dense), norm="L1", K=2, lam=0.3)[0]
    lin = nn.Linear(9, 6).double()
    with torch.no_grad():
        lin.weight.copy_(dense.weight.t())
        lin.bias.copy_(dense.bias)
    ref = rs.NRPMLinear.from_dense(lin, rs.NRPMSettings("L1", 2), lam=0.3)
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(nrpm(x), ref(x), rtol=1e-12, atol=1e-12)


def test_bert_from_a_transformers_config_is_exact_at_lambda_one():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    net = rs.convert(model, lam=1.0)
    assert len(rs.nrpm_layers(net)) == 2 * 6 + 1  # q, k, v, attention out, intermediate, output; pooler
    with torch.no_grad():
        assert torch.equal(net(ids).last_hidden_state, want)
    _same_state(rs.unconvert(net), model)


# ------------------------------------------------------------------ nn.MultiheadAttention
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_is_exact_at_lambda_one_and_matches_its_own_projections(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.zeros(3 if batch_first else 5, 5 if batch_first else 3, dtype=torch.bool)
    mask[:, -1] = True
    net = rs.convert(nn.ModuleDict({"attn": mha}), lam=1.0)
    conv = net["attn"]
    assert isinstance(conv, NRPMMultiheadAttention) and type(conv.out_proj).__name__ == "NRPMLinear"
    want = mha(x, x, x, need_weights=need_weights)
    got = conv(x, x, x, need_weights=need_weights)
    assert torch.equal(got[0], want[0]) and (got[1] is None) == (want[1] is None)
    # through our own path (the out_proj's λ below 1 forces it): still torch's attention at λ = 1 projections
    conv.out_proj.set_lam(1.0 - 1e-12)
    got = conv(x, x, x, key_padding_mask=mask, need_weights=need_weights)
    want = mha(x, x, x, key_padding_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-10)
    back = rs.unconvert(net)
    assert type(back["attn"]) is nn.MultiheadAttention
    assert type(back["attn"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    _same_state(back, nn.ModuleDict({"attn": mha}))


def test_multihead_attention_projections_are_nrpm_below_lambda_one():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5).double()
    q, k, v = torch.randn(4, 2, 8).double(), torch.randn(3, 2, 6).double(), torch.randn(3, 2, 5).double()
    conv = rs.convert(nn.ModuleDict({"a": mha}), norm="L1", K=2, lam=0.4)["a"]
    settings = rs.NRPMSettings("L1", 2)
    lin = lambda x, w, b: nrpm_linear(x, w, b, 0.4, settings)  # noqa: E731
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    eye = torch.eye(8, dtype=torch.float64)
    inner, _ = nn.functional.multi_head_attention_forward(
        lin(q, mha.q_proj_weight, bq), lin(k, mha.k_proj_weight, bk), lin(v, mha.v_proj_weight, bv), 8, 2, None, None,
        None, None, False, 0.0, eye, None, training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    want = lin(inner, mha.out_proj.weight, mha.out_proj.bias)
    got, _ = conv.eval()(q, k, v, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert conv.lam_logit.grad is not None and conv.q_proj_weight.grad is not None


def test_a_converted_transformer_encoder_layer_never_takes_torchs_fused_fast_path():
    """nn.TransformerEncoderLayer in eval mode without gradients runs one fused kernel on its
    children's weights and skips their forwards: a converted layer must still compute NRPM there
    (this is how clean accuracy is measured), and unconverting gives the fast path back."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        dense = layer(x)
    conv = rs.convert(layer, norm="L1", K=1, lam=0.5).eval()
    with_grad = conv(x).detach()  # gradients on: torch's own fallback, the children's forwards
    with torch.no_grad():
        fused_conditions = conv(x)
    torch.testing.assert_close(fused_conditions, with_grad, rtol=1e-6, atol=1e-6)
    assert float((fused_conditions - dense).abs().max()) > 0.05  # NRPM, not the dense layer
    back = rs.unconvert(conv)
    assert not any(m._forward_pre_hooks for m in back.modules())
    with torch.no_grad():
        torch.testing.assert_close(back(x), dense, rtol=0, atol=0)


def test_torchvision_vit_converts_every_projection_and_is_exact_at_lambda_one():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                              mlp_dim=64, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = vit(x)
    net = rs.convert(vit, lam=1.0)
    kinds = {n: type(m).__name__ for n, m in net.named_modules()}
    assert kinds["encoder.layers.encoder_layer_0.self_attention"] == "NRPMMultiheadAttention"
    assert kinds["encoder.layers.encoder_layer_0.self_attention.out_proj"] == "NRPMLinear"
    assert not [r for r in skipped_layers(net)], skipped_layers(net)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    report = rs.conversion_report(net, (3, 32, 32))
    assert all(row.ran for row in report.layers)


# ------------------------------------------------------------------ timm
def test_timm_tf_efficientnet_converts_its_same_padded_convs_and_linear_head():
    timm = pytest.importorskip("timm")
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False, num_classes=10).eval()
    same = [n for n, m in model.named_modules() if type(m) is Conv2dSame]
    assert len(same) == 5
    x = torch.rand(1, 3, 33, 35)  # odd sizes: the padding is uneven
    with torch.no_grad():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        net = rs.convert(model, lam=1.0)
    kinds = dict(net.named_modules())
    assert all(type(kinds[n]).__name__ == "NRPMConv2dSame" for n in same)
    assert type(net.classifier).__name__ == "NRPMLinear"
    assert not skipped_layers(net)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    back = rs.unconvert(net)
    assert _types(back) == _types(model)
    _same_state(back, model)


def test_nrpm_conv2d_same_pads_like_timm_then_matches_patterns():
    pytest.importorskip("timm")
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    same = Conv2dSame(3, 4, 3, stride=2).double()
    plain = nn.Conv2d(3, 4, 3, stride=2).double()
    plain.load_state_dict(same.state_dict())
    x = torch.rand(2, 3, 9, 8, dtype=torch.float64)
    got = rs.convert(nn.Sequential(same), norm="L1", K=2, lam=0.3)[0](x)
    ref = rs.convert(nn.Sequential(plain), norm="L1", K=2, lam=0.3)[0](nn.functional.pad(x, (0, 1, 1, 1)))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ nothing skipped silently
class _Custom(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_skipped_layers_are_listed_with_their_reason_and_missing_converters_warn():
    model = nn.Sequential(nn.Linear(4, 4), _Custom(4, 4), nn.LSTM(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"2 Linear/Conv-like layers left unconverted.*_Custom.*LSTM"):
        net = rs.convert(model, exclude="3")
    rows = {r["name"]: r["reason"] for r in skipped_layers(net)}
    assert set(rows) == {"1", "2", "3"}
    assert rows["3"] == "excluded (exclude=)" and "Linear subclass with a forward of its own" in rows["1"]
    assert rows["2"].startswith("no converter for LSTM")
    report = rs.conversion_report(net).to_dict()
    assert [g["type"] for g in report["skipped"]] == ["_Custom", "LSTM", "Linear"]


class _TableAttention(nn.Module):
    """An attention with a 2-D score table (as LeViT's attention_biases, Swin's relative_position_bias_table)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.attention_biases = nn.Parameter(torch.zeros(3, 3))
        self.rel_pos_h = nn.Parameter(torch.zeros(5, 2))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-1, -2) + self.attention_biases).softmax(-1) @ v


class _MatchAttention(_TableAttention):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))


def test_score_tables_are_not_weights_but_a_weight_matrix_of_its_own_is_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = rs.convert(nn.ModuleDict({"attn": _TableAttention()}))
    assert skipped_layers(net) == []
    with pytest.warns(UserWarning, match=r"1 Linear/Conv-like layer left unconverted.*_MatchAttention \(attn\)"):
        net = rs.convert(nn.ModuleDict({"attn": _MatchAttention()}))
    assert [r["name"] for r in skipped_layers(net)] == ["attn"]


def test_an_override_that_matches_no_selected_layer_warns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="override '1' matches no selected layer"):
        rs.convert(model, include="0", overrides={"1": {"lam": 1.0}})


class _ReadsChildWeight(nn.Module):
    """A parent that hands its child's weight to F.linear (as torchvision's Swin attention did)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(x, self.inner.weight, self.inner.bias))


def test_converted_layers_that_never_run_are_marked_in_the_report():
    """A parent that reads its child's weight directly: that NRPM layer never runs; the report says so."""
    net = rs.convert(_ReadsChildWeight(), lam=0.5)
    report = rs.conversion_report(net, (4,))
    assert [r.name for r in report.layers if r.ran is False] == ["inner"]
    assert [r.name for r in report.layers if r.ran] == ["head"]
    assert len(report.notes) == 1 and "1 converted layer did not run in the probe forward (inner)" in report.notes[0]


# ------------------------------------------------------------------ shared modules
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = self.b = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_a_shared_module_stays_shared_through_convert_save_load_and_unconvert(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    net = rs.convert(model, norm="L1", K=1, lam=0.5)
    assert net.a is net.b and isinstance(net.a, rs.NRPMLinear)
    path = tmp_path / "tied.safetensors"
    rs.save(net, path, arch="test_library_layers:_Tied")
    assert set(rs.read_manifest(path)["layers"]) == {"a", "b", "head"}
    back = rs.load(path, trust_code=True)
    assert back.a is back.b and isinstance(back.a, rs.NRPMLinear)
    x = torch.rand(3, 4)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)
    plain = rs.unconvert(back)
    assert plain.a is plain.b and type(plain.a) is nn.Linear


class _Skippy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(self.fc(x).unsqueeze(0))[0][0])


def test_cli_convert_and_inspect_list_what_they_leave_unconverted(tmp_path):
    import json

    from typer.testing import CliRunner

    from robust_surgery.cli.app import app

    runner = CliRunner()
    plain = tmp_path / "plain.safetensors"
    rs.save(_Skippy(), plain, arch="test_library_layers:_Skippy")
    res = runner.invoke(app, ["inspect", str(plain), "--trust-code", "--input-shape", "4", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [r["name"] for r in report["layers"]] == ["fc", "head"]
    assert report["skipped"] == [{"type": "GRU", "reason": "no converter for GRU; register one with "
                                  "@robust_surgery.register_converter(GRU)", "count": 1, "names": ["rnn"]}]
    out = tmp_path / "s.safetensors"
    res = runner.invoke(app, ["convert", str(plain), "--trust-code", "--input-shape", "4",
                              "--exclude", "head", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning: convert: 1 Linear/Conv-like layer left unconverted" in res.stderr
    assert "Not converted: 2 Linear/Conv-like layers" in res.stdout
    assert "1 × GRU: no converter for GRU" in res.stdout and "1 × Linear: excluded (exclude=) (head)" in res.stdout


def test_layers_converted_at_lambda_one_by_an_override_are_noted_in_the_report():
    net = rs.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), lam=0.5, overrides={"1": {"lam": 1.0}})
    notes = rs.conversion_report(net).notes
    assert len(notes) == 1 and notes[0].startswith("1 converted layer at λ = 1 run as the original layer (1)")


@pytest.mark.parametrize("family", ["transformers-vit", "torchvision-swin", "timm-vit", "timm-convnext"])
def test_more_real_architectures_are_exact_at_lambda_one_and_unconvert_to_themselves(family):
    torch.manual_seed(0)
    if family == "transformers-vit":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
        model, run = transformers.ViTModel(cfg).eval(), lambda m, x: m(pixel_values=x).last_hidden_state
    elif family == "torchvision-swin":
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                   window_size=[4, 4], num_classes=10).eval()
        run = lambda m, x: m(x)  # noqa: E731
    else:
        timm = pytest.importorskip("timm")
        name = {"timm-vit": "vit_tiny_patch16_224", "timm-convnext": "convnext_atto"}[family]
        extra = {"img_size": 32, "patch_size": 8} if family == "timm-vit" else {}
        model, run = timm.create_model(name, pretrained=False, num_classes=10, **extra).eval(), lambda m, x: m(x)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every Linear/Conv-like layer converts (Swin's attention: tests/nn/test_swin.py)
        net = rs.convert(model, lam=1.0)
    assert len(rs.nrpm_layers(net)) >= 4
    with torch.no_grad():
        assert torch.equal(run(net, x), want)
    back = rs.unconvert(net)
    assert _types(back) == _types(model)
    _same_state(back, model)
