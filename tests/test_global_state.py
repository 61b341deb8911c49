"""The state-leak guard (tests/helpers/global_state.py, autouse through tests/conftest.py) fails a test
or a test file that leaves process-wide state changed, names what changed, and puts it back so that
the tests after it run as they would have; a test that changes state only for itself passes.

The leaking tests run in a pytest session of their own (a subprocess), with the same two fixtures."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.helpers import global_state
from tests.helpers.subprocess_env import own_session_env

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """\
from tests.helpers.global_state import (  # noqa: F401
    each_file_leaves_global_state_unchanged,
    each_test_leaves_global_state_unchanged,
)
"""

# each leaking test is followed by one that needs the state back as it was
LEAKING_TESTS = """\
import os

import mae_kernels
import torch
from torch._inductor import config as inductor_config


def test_monkeypatch_hides_an_inductor_entry(monkeypatch):  # the bug of issue 29
    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", True)


def test_the_inductor_entry_reads_again():
    assert inductor_config.cpp.enable_kernel_profile is False


def test_sets_an_environment_variable():
    os.environ["AVFMAE_LEAK_PROBE"] = "1"


def test_the_environment_variable_is_gone():
    assert "AVFMAE_LEAK_PROBE" not in os.environ


def test_changes_the_default_dtype():
    torch.set_default_dtype(torch.float64)


def test_the_default_dtype_is_back():
    assert torch.get_default_dtype() == torch.float32


LEFT_OPEN = []  # a context left open stays open only while referenced (closing the generator exits it)


def test_enters_a_kernels_backend_and_never_leaves():
    LEFT_OPEN.append(mae_kernels.backend("triton"))
    LEFT_OPEN[-1].__enter__()


def test_the_backend_is_the_environment_one_again():
    assert mae_kernels.dispatch.requested_backend() == "torch"


def test_changes_state_only_for_itself(monkeypatch):
    monkeypatch.setenv("AVFMAE_LEAK_PROBE", "1")
    with inductor_config.patch({"cpp.enable_kernel_profile": True}), mae_kernels.backend("triton"):
        assert inductor_config.cpp.enable_kernel_profile is True
"""

LEAKING_FILE = """\
import os

import pytest


@pytest.fixture(scope="module")
def dataset():
    os.environ["AVFMAE_FILE_LEAK_PROBE"] = "1"  # a module fixture that never restores
    yield


def test_uses_the_dataset(dataset):
    pass
"""

CHECK_AFTER_FILE = """\
import os


def test_the_file_variable_is_gone():
    assert "AVFMAE_FILE_LEAK_PROBE" not in os.environ
"""

LEAKS = {  # leaking test -> what its error must name
    "test_monkeypatch_hides_an_inductor_entry":
        "torch._inductor.config['cpp.enable_kernel_profile']: False -> hidden",
    "test_sets_an_environment_variable": "os.environ['AVFMAE_LEAK_PROBE']: '<unset>' -> '1'",
    "test_changes_the_default_dtype": "torch.get_default_dtype(): torch.float32 -> torch.float64",
    "test_enters_a_kernels_backend_and_never_leaves": "mae_kernels.backend(...) in force: None -> 'triton'",
    "test_uses_the_dataset": "test file test_b_file_leak.py left process-wide state changed",
}


def _run_leaking_session(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Outcome ('passed' / 'failed' / 'error') and message of each test of the inner session, by name."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_a_leaks.py").write_text(LEAKING_TESTS)
    (tmp_path / "test_b_file_leak.py").write_text(LEAKING_FILE)
    (tmp_path / "test_c_after_file.py").write_text(CHECK_AFTER_FILE)
    report = tmp_path / "report.xml"
    env = own_session_env(PYTHONPATH=str(ROOT), MAE_KERNELS_BACKEND="torch", TRITON_INTERPRET="1")
    env.pop("PYTEST_ADDOPTS", None)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                    "-p", "no:randomly", f"--junitxml={report}", str(tmp_path)],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        problem = case.find("error")
        if problem is None:
            problem = case.find("failure")
        outcomes[case.get("name")] = (("passed", "") if problem is None
                                      else (problem.tag, (problem.get("message") or "") + (problem.text or "")))
    return outcomes


def test_the_guard_fails_each_leaking_test_names_the_change_and_puts_it_back(tmp_path):
    outcomes = _run_leaking_session(tmp_path)
    assert len(outcomes) == 11, outcomes
    for name, named_change in LEAKS.items():
        outcome, message = outcomes[name]
        assert outcome == "error" and named_change in message, (name, outcomes[name])
    clean = {name: outcome for name, outcome in outcomes.items() if name not in LEAKS}
    assert clean == dict.fromkeys(clean, ("passed", "")), clean


def test_a_snapshot_sees_a_hidden_config_entry_that_get_config_copy_does_not():
    from torch._inductor import config as inductor_config

    before = global_state.snapshot()
    values = inductor_config.get_config_copy()
    delattr(inductor_config.cpp, "enable_kernel_profile")  # what monkeypatch's undo did
    try:
        assert inductor_config.get_config_copy() == values
        assert global_state.changes(before, global_state.snapshot()) == [
            "torch._inductor.config['cpp.enable_kernel_profile']: False -> hidden (reads as 'does not exist'; "
            "value False)"]
    finally:
        global_state.restore(before, global_state.snapshot())
    assert inductor_config.cpp.enable_kernel_profile is False
    assert global_state.changes(before, global_state.snapshot()) == []
