"""The evaluation's vocabularies are enums that are their strings."""
import json

from robust_surgery.evaluation.checks import CheckResult
from robust_surgery.evaluation.kinds import Check, CheckJob, Source


def test_members_equal_format_and_serialise_as_their_strings():
    assert Source.DIRECT == "direct" and Source("bpda") is Source.BPDA
    assert f"{CheckJob.HUGE_EPS}" == "huge-eps" and str(Check.DETERMINISTIC) == "outputs are deterministic"
    assert json.dumps({"s": Source.TRANSFER, "c": CheckJob.PGD_STRONGER}) == '{"s": "transfer", "c": "pgd-stronger"}'
    assert {CheckJob(s.value) for s in (Source.TRANSFER, Source.BPDA)} == {CheckJob.TRANSFER, CheckJob.BPDA}


def test_a_report_card_line_names_its_check():
    line = CheckResult(Check.PGD_BEATS_FGSM, True, "FGSM: 0 new points broken (0.0 %), allowed 1", eps=0.1)
    assert line.name == "FGSM adds nothing to the iterative attacks" and line.name is Check.PGD_BEATS_FGSM
    assert line.eps == 0.1


def test_rows_hold_plain_strings_so_state_files_load_with_weights_only(tmp_path):
    import torch
    from torch import nn

    import robust_surgery as rs

    torch.manual_seed(0)
    model = rs.convert(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), paradigm=1, norm="L1", K=2, lam=0.5)
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 3
    report = rs.evaluate(model, (x, y), attacks=("fgsm", "transfer"), eps=(0.1,), state=tmp_path / "run.state")
    assert {type(r["source"]) for r in report.results} == {str}
    assert {type(r["check"]) for r in report.results if r["check"] is not None} == {str}
    assert {r["source"] for r in report.results} >= {"direct", "transfer"}
    torch.load(tmp_path / "run.state", weights_only=True)  # no enum objects pickled into the state
