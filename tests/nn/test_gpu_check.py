"""benchmarks/gpu_check.py --cpu-smoke: the GPU check's code on tiny sizes (Triton's interpreter), so it cannot rot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUST_SURGERY_NRPM_")}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = report["correctness"]["cases"]
    assert report["correctness"]["passed"] and len(cases) == 24
    assert all(c["triton_calls"] >= 2 for c in cases)  # the Triton path ran (in the interpreter), not eager
    assert max(c["rel_err_grad_w"] for c in cases if c["dtype"] == "float64") <= 1e-9
    timed = {row["case"]: row for row in report["timing"]["measured"]["cases"]}
    assert set(timed) == {"linear", "conv8"} and all(r["results"]["triton"]["triton_launches"] > 0 for r in timed.values())
    training = report["training"]
    assert training["images_per_s"] > 0 and training["triton_forward_calls"] > 0 and training["n_train"] == 16
