"""Process-wide state a test can change, read into a snapshot, compared and put back.

``make test`` runs the files in two xdist workers, each worker taking whole files in whatever order
the scheduler hands them out, so state one file leaves behind reaches every file its worker runs
next: the suite then passes or fails by the luck of scheduling. That happened (issue 29): pytest's
``monkeypatch.setattr`` on ``torch._inductor.config.cpp`` undoes by *deleting* the attribute (the
config object serves it through ``__getattr__``, so pytest finds no instance entry to put back), and
torch's config hides a deleted entry, so the next cold compile in that process raised "does not
exist". The two autouse fixtures at the end (imported by tests/conftest.py) compare every test and
every test file with a snapshot taken before it, put the state back and fail the one that changed it;
tests/test_global_state.py shows them failing leaking tests.

What is read, each part something a test here can reach and a later test depends on:
- the environment variables, the working directory and ``sys.path``;
- torch's process-wide switches: default dtype and device, deterministic algorithms, grad / anomaly /
  inference mode, matmul precision and TF32, the cuDNN and SDPA backend flags, autocast, the number
  of threads, whether a process group is initialised;
- every entry of the inductor, dynamo and functorch configs, value *and* hidden flag (a hidden entry
  reads like a missing one, which is the bug above: ``get_config_copy()`` alone does not show it);
- the kernels' backend forced by ``mae_kernels.backend(...)`` (thread-local; the environment
  variable is in the first part).

Not read: the random number generators. Every test that depends on random values seeds its own
generator or calls ``torch.manual_seed`` first, and many tests draw from the global one on purpose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

ENV_NOT_COMPARED = frozenset({
    "PYTEST_CURRENT_TEST",  # pytest's own, rewritten around each phase of a test ("(setup)", "(call)", ...)
    # inductor's handshake with each CPU module it compiles: written (the same value) before every load
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
})


@dataclass(frozen=True)
class Setting:
    """One process-wide switch: how to read it and, where torch offers a way, how to put it back."""

    name: str
    read: Callable[[], Any]
    write: Callable[[Any], None] | None = None


def _attribute(owner: Any, attr: str, label: str) -> Setting:
    return Setting(label, lambda: getattr(owner, attr), lambda value: setattr(owner, attr, value))


def _deterministic() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _anomaly() -> tuple[bool, bool]:
    return torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()


def _sdpa_flag(kind: str) -> Setting:
    backends = torch.backends.cuda
    return Setting(f"torch.backends.cuda.{kind}_sdp_enabled()", getattr(backends, f"{kind}_sdp_enabled"),
                   getattr(backends, f"enable_{kind}_sdp"))


def _autocast(device: str) -> Setting:
    def write(value: tuple[bool, torch.dtype]) -> None:
        torch.set_autocast_enabled(device, value[0])
        torch.set_autocast_dtype(device, value[1])

    return Setting(f"autocast({device!r}) (enabled, dtype)",
                   lambda: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)), write)


def _leave_process_group(was_initialised: bool) -> None:
    if not was_initialised and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def torch_settings() -> list[Setting]:
    import torch.utils.deterministic

    return [
        Setting("torch.get_default_dtype()", torch.get_default_dtype, torch.set_default_dtype),
        Setting("torch.get_default_device()", torch.get_default_device, torch.set_default_device),
        Setting("deterministic algorithms (enabled, warn_only)", _deterministic,
                lambda value: torch.use_deterministic_algorithms(value[0], warn_only=value[1])),
        _attribute(torch.utils.deterministic, "fill_uninitialized_memory",
                   "torch.utils.deterministic.fill_uninitialized_memory"),
        Setting("torch.is_grad_enabled()", torch.is_grad_enabled, torch.set_grad_enabled),
        Setting("torch.is_inference_mode_enabled()", torch.is_inference_mode_enabled),
        Setting("anomaly detection (enabled, check_nan)", _anomaly, lambda value: torch.set_anomaly_enabled(*value)),
        Setting("torch.get_float32_matmul_precision()", torch.get_float32_matmul_precision,
                torch.set_float32_matmul_precision),
        Setting("torch.get_num_threads()", torch.get_num_threads, torch.set_num_threads),
        _attribute(torch.backends.cuda.matmul, "allow_tf32", "torch.backends.cuda.matmul.allow_tf32"),
        _attribute(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction",
                   "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction"),
        _attribute(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction",
                   "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction"),
        *(_attribute(torch.backends.cudnn, flag, f"torch.backends.cudnn.{flag}")
          for flag in ("enabled", "benchmark", "deterministic", "allow_tf32")),
        _attribute(torch.backends.mkldnn, "enabled", "torch.backends.mkldnn.enabled"),
        *(_sdpa_flag(kind) for kind in ("flash", "mem_efficient", "math", "cudnn")),
        *(_autocast(device) for device in ("cpu", "cuda")),
        Setting("torch.distributed.is_initialized()", torch.distributed.is_initialized, _leave_process_group),
    ]


def compiler_configs() -> list[Any]:
    import torch._dynamo.config
    import torch._functorch.config
    import torch._inductor.config

    return [torch._inductor.config, torch._dynamo.config, torch._functorch.config]


def _config_state(config: Any) -> dict[str, tuple[bool, Any]]:
    # _config (the entries) is private, but it is the only place the hidden flag can be read
    values = config.get_config_copy()
    return {key: (entry.hide, values.get(key)) for key, entry in config._config.items()}


def _kernels_backend() -> str | None:
    from mae_kernels import dispatch

    return getattr(dispatch._local, "backend", None)


def _force_kernels_backend(name: str | None) -> None:
    from mae_kernels import dispatch

    dispatch._local.backend = name


def snapshot() -> dict[str, Any]:
    """Every value this module compares, by a name that says where it lives."""
    state: dict[str, Any] = {
        "os.environ": {k: v for k, v in os.environ.items() if k not in ENV_NOT_COMPARED},
        "os.getcwd()": os.getcwd(),
        "sys.path": list(sys.path),
        "mae_kernels.backend(...) in force": _kernels_backend(),
    }
    state.update((setting.name, setting.read()) for setting in torch_settings())
    state.update((config.__name__, _config_state(config)) for config in compiler_configs())
    return state


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a truth value: compare identity
        return a is b


def _config_entry(entry: Any) -> str:
    if not isinstance(entry, tuple):
        return repr(entry)  # "<unset>"
    hidden, value = entry
    return f"hidden (reads as 'does not exist'; value {value!r})" if hidden else repr(value)


def _dict_changes(name: str, before: dict, after: dict, show: Callable[[Any], str] = repr) -> list[str]:
    return [f"{name}[{key!r}]: {show(before.get(key, '<unset>'))} -> {show(after.get(key, '<unset>'))}"
            for key in sorted(before.keys() | after.keys(), key=str)
            if not _same(before.get(key, "<unset>"), after.get(key, "<unset>"))]


def _path_change(old: list[str], new: list[str]) -> str:
    added, removed = [p for p in new if p not in old], [p for p in old if p not in new]
    if added or removed:
        return f"sys.path: added {added}, removed {removed}"
    return f"sys.path: {old} -> {new}"  # an entry repeated or moved


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """One line per value that differs, naming it, with its old and new value."""
    configs = {config.__name__ for config in compiler_configs()}
    lines = []
    for name, old in before.items():
        new = after[name]
        if isinstance(old, dict):
            lines += _dict_changes(name, old, new, _config_entry if name in configs else repr)
        elif name == "sys.path" and old != new:
            lines.append(_path_change(old, new))
        elif not _same(old, new):
            lines.append(f"{name}: {old!r} -> {new!r}")
    return lines


def restore(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Put back every value that differs between the two snapshots; returns what could not be put back."""
    stuck = []
    for name in after["os.environ"].keys() - before["os.environ"].keys():
        del os.environ[name]
    os.environ.update(before["os.environ"])  # the variables not compared stay as they are
    os.chdir(before["os.getcwd()"])
    sys.path[:] = before["sys.path"]
    _force_kernels_backend(before["mae_kernels.backend(...) in force"])
    for setting in torch_settings():
        if not _same(before[setting.name], after[setting.name]):
            if setting.write is None:
                stuck.append(setting.name)
            else:
                setting.write(before[setting.name])
    for config in compiler_configs():
        old, new = before[config.__name__], after[config.__name__]
        for key, (hidden, value) in old.items():
            if _same((hidden, value), new.get(key)):
                continue
            if hidden:
                delattr(config, key)  # how an entry gets hidden (unittest.mock and monkeypatch delete)
            else:
                setattr(config, key, value)  # what config.patch does on exit; it un-hides the entry too
    return stuck


def _fail_if_changed(before: dict[str, Any], what: str) -> None:
    after = snapshot()
    leaked = changes(before, after)
    if not leaked:
        return
    stuck = restore(before, after)
    put_back = f"put back for the tests after it, except {', '.join(stuck)}" if stuck else "put back"
    pytest.fail(f"{what} left process-wide state changed ({put_back}):\n  " + "\n  ".join(leaked)
                + "\nChange it for the test only: monkeypatch.setenv, a config's .patch(...) as a context "
                "manager, `with mae_kernels.backend(...)` (tests/helpers/global_state.py).", pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def each_file_leaves_global_state_unchanged(request):
    """Module fixtures (datasets, launched runs) are checked too: their teardown runs before this one's."""
    before = snapshot()
    yield
    _fail_if_changed(before, f"test file {request.node.nodeid}")


@pytest.fixture(autouse=True)
def each_test_leaves_global_state_unchanged(request):
    before = snapshot()
    yield
    _fail_if_changed(before, f"test {request.node.nodeid}")
