"""Shared test fixtures: the real data sets live in ../shared/data beside the checkout."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# tests/nrpm_reference.py (the float64 reference the kernel tests compare with) imports from every subfolder
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _data_root_env(tmp_path_factory):
    """Point the library's data root at ../shared/data and keep its cache inside the test session."""
    old = {k: os.environ.get(k) for k in ("ROBUST_SURGERY_DATA", "ROBUST_SURGERY_CACHE")}
    os.environ["ROBUST_SURGERY_DATA"] = str(SHARED_DATA)
    os.environ.setdefault("ROBUST_SURGERY_CACHE", str(Path.home() / ".cache" / "robust_surgery"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


NEEDS_DATA = (f"needs the shared data sets at {SHARED_DATA} (../shared/data beside the checkout; "
              "the data sets and reference checkpoints the tests read)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(NEEDS_DATA)
    return SHARED_DATA


DATA_NOT_FOUND = ("Looked in:", "ROBUST_SURGERY_DATA=DIR")  # what every DataNotFoundError message says


def _needs_missing_data(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what it was raised from) says a data set or reference checkpoint is missing."""
    from robust_surgery.data.datasets import DataNotFoundError

    seen = 0
    while exc is not None and seen < 8:
        # the error itself, or a CLI test's assertion that shows the one-line error it printed
        if isinstance(exc, DataNotFoundError) or (isinstance(exc, AssertionError) and all(m in str(exc) for m in DATA_NOT_FOUND)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without ../shared/data, a test that stops because a data file is missing is reported as
    skipped (with the reason), not failed; with the data present nothing changes."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and not SHARED_DATA.is_dir() and _needs_missing_data(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NEEDS_DATA}")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No data anywhere: an empty data root, a private cache, downloads off. Returns the empty root."""
    empty = tmp_path / "empty-root"
    empty.mkdir()
    monkeypatch.setenv("ROBUST_SURGERY_DATA", str(empty))
    monkeypatch.setenv("ROBUST_SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUST_SURGERY_NO_DOWNLOAD", "1")
    return empty
