"""Test-wide settings, and a guard: every test must leave process-wide state as it found it."""

import os
import sys
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _nanoseek_globals() -> dict[tuple[str, str], tuple[int, str | None]]:
    """Every module-level name of the loaded nanoseek modules: the object's identity, and for containers
    (which a test could mutate in place) their repr. A changed entry is a leaked setting or monkeypatch."""
    state = {}
    for mod_name, module in list(sys.modules.items()):
        if not (mod_name == "nanoseek" or mod_name.startswith("nanoseek.")) or module is None:
            continue
        for name, value in list(vars(module).items()):
            if name.startswith("__") or isinstance(value, types.ModuleType):
                continue
            shown = repr(value) if isinstance(value, dict | list | set) else None
            state[(mod_name, name)] = (id(value), shown)
    return state


def _process_settings() -> dict[str, object]:
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_num_interop_threads()": torch.get_num_interop_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_anomaly_enabled()": torch.is_anomaly_enabled(),
        "torch.get_float32_matmul_precision()": torch.get_float32_matmul_precision(),
        "torch.distributed.is_initialized()": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "os.getcwd()": os.getcwd(),
    }


# Set by others, not by the code under test: pytest (the current test's name, per phase), and torch's
# inductor, which writes its own variables into the environment when it first compiles (its cache folder,
# `_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR`, ...).
_ENV_NOT_OURS = {"PYTEST_CURRENT_TEST"}
_ENV_PREFIXES_NOT_OURS = ("TORCHINDUCTOR_", "_TORCHINDUCTOR_")


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _ENV_NOT_OURS and not k.startswith(_ENV_PREFIXES_NOT_OURS)}


def _restore(settings: dict[str, object], environ: dict[str, str]) -> None:
    """Put back what can be put back, so one leaking test does not fail the tests after it."""
    torch.set_num_threads(settings["torch.get_num_threads()"])
    torch.set_default_dtype(settings["torch.get_default_dtype()"])
    torch.use_deterministic_algorithms(settings["torch.are_deterministic_algorithms_enabled()"])
    torch.set_grad_enabled(settings["torch.is_grad_enabled()"])
    torch.autograd.set_detect_anomaly(settings["torch.is_anomaly_enabled()"])
    torch.set_float32_matmul_precision(settings["torch.get_float32_matmul_precision()"])
    os.chdir(settings["os.getcwd()"])
    for key in _environ().keys() - environ.keys():
        del os.environ[key]
    os.environ.update(environ)


@pytest.fixture(autouse=True)
def leaves_process_state_alone(request):
    """Fails the test that changed a thread count, an environment variable, torch's default dtype,
    determinism, grad or anomaly mode, the matmul precision, the working directory, or a nanoseek module
    global, without putting it back (monkeypatch's changes are undone before this check runs)."""
    settings, environ, module_state = _process_settings(), _environ(), _nanoseek_globals()
    yield
    problems = []
    after = _process_settings()
    problems += [f"{k} was {settings[k]!r}, left {after[k]!r}" for k in settings if after[k] != settings[k]]
    now_env = _environ()
    for key in sorted(environ.keys() | now_env.keys()):
        if environ.get(key) != now_env.get(key):
            problems.append(f"os.environ[{key!r}] was {environ.get(key)!r}, left {now_env.get(key)!r}")
    now_modules = _nanoseek_globals()
    for key, (ident, shown) in module_state.items():
        if key not in now_modules:
            problems.append(f"{key[0]}.{key[1]} was deleted")
        elif now_modules[key] != (ident, shown):
            problems.append(f"{key[0]}.{key[1]} was replaced or changed in place")
    if problems:
        _restore(settings, environ)
        pytest.fail(f"{request.node.nodeid} changed process-wide state:\n  " + "\n  ".join(problems), pytrace=False)
