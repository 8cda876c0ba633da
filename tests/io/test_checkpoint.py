"""The one checkpoint reader: formats, the pickle consent, state_dict extraction, fitting a model."""
import pytest
import torch
from torch import nn

from robust_surgery.errors import ModelLoadError
from robust_surgery.io.checkpoint import extract_state_dict, load_weights, read_checkpoint, weight_mismatches


class Holder:  # a custom class: torch.load(weights_only=True) refuses it
    def __init__(self):
        self.w = torch.ones(2)


def test_safetensors_and_torch_files_read_the_same_tensors(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.zeros(2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "m.pt")
    from_st = extract_state_dict(read_checkpoint(tmp_path / "m.safetensors"), "m.safetensors")
    from_pt = extract_state_dict(read_checkpoint(tmp_path / "m.pt"), "m.pt")  # nested and prefixed
    assert from_st.keys() == from_pt.keys() == sd.keys()
    assert all(torch.equal(from_st[k], sd[k]) and torch.equal(from_pt[k], sd[k]) for k in sd)


def test_pickled_objects_need_consent_and_the_zoo_offers_none(tmp_path):
    torch.save({"obj": Holder()}, tmp_path / "p.pt")
    with pytest.raises(ModelLoadError, match="pickled Python objects.*pass --trust-pickle"):
        read_checkpoint(tmp_path / "p.pt")
    with pytest.raises(ModelLoadError, match=r"refused \(torch.load weights_only=True\)\. Re-save it as a plain state_dict") as err:
        read_checkpoint(tmp_path / "p.pt", consent_flag=None)
    assert "--trust-pickle" not in str(err.value)
    assert isinstance(read_checkpoint(tmp_path / "p.pt", trust_pickle=True)["obj"], Holder)


def test_damaged_files_are_clear_errors(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="x.pt is not a PyTorch file"):
        read_checkpoint(tmp_path / "x.pt")
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        read_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(ModelLoadError, match="expected a checkpoint dict with a state_dict under key 'model'"):
        extract_state_dict({"net": {"w": torch.ones(1)}}, "f.pt", key="model")


def test_fitting_reports_missing_unexpected_and_wrong_shapes():
    model = nn.Linear(3, 2)
    sd = {"weight": torch.zeros(2, 4), "extra": torch.zeros(1)}
    assert weight_mismatches(model, sd) == (["bias"], ["extra"], ["weight"])
    with pytest.raises(ModelLoadError, match=r"weight has shape \(2, 4\), the model wants \(2, 3\)"):
        load_weights(model, sd, strict=False, where="f.pt")
    with pytest.raises(ModelLoadError, match="1 missing \\(bias\\), 0 unexpected.*--non-strict"):
        load_weights(model, {"weight": torch.ones(2, 3)}, strict=True, where="f.pt")
    load_weights(model, {"weight": torch.ones(2, 3)}, strict=False, where="f.pt")
    assert torch.equal(model.weight.detach(), torch.ones(2, 3))
