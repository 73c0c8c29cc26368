"""Import rules (DESIGN.md §2): the core needs neither framework; each backend needs only its own."""

import subprocess
import sys
import textwrap

import pytest

TORCH = ("torch",)
TENSORFLOW = ("tensorflow", "keras", "tf_keras")


_BLOCKER = """
import importlib.abc
import importlib.util
import sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
_find_spec = importlib.util.find_spec
# mct-quantizers detects the frameworks with importlib.util.find_spec: answer as if they were not installed.
importlib.util.find_spec = lambda name, package=None: (
    None if name.partition(".")[0] in BLOCKED else _find_spec(name, package)
)
"""


def run_with_blocked(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `modules` behave as if they were not installed."""
    prelude = _BLOCKER.format(blocked=set(modules))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_core_imports_without_torch_and_tensorflow():
    result = run_with_blocked(
        TORCH + TENSORFLOW,
        """
        import trainable_infra
        from trainable_infra import QATConfig, TrainableQuantizerWeightsConfig, get_trainable_quantizer_class
        from trainable_infra.common import numerics
        loaded = [m for m in ("torch", "tensorflow", "keras") if sys.modules.get(m) is not None]
        print("loaded:", loaded)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


@pytest.mark.parametrize(
    ("package", "blocked", "extra"),
    [("pytorch_backend", TORCH, "torch"), ("keras_backend", TENSORFLOW, "keras")],
)
def test_backend_without_its_framework_names_the_extra(package, blocked, extra):
    result = run_with_blocked(blocked, f"import trainable_infra.{package}")
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert f"pip install 'trainable-infra[{extra}]'" in result.stderr


@pytest.mark.parametrize(
    ("package", "blocked", "framework"),
    [("pytorch_backend", TENSORFLOW, "torch"), ("keras_backend", TORCH, "tensorflow")],
)
def test_backend_imports_without_the_other_framework(package, blocked, framework):
    pytest.importorskip(framework)
    result = run_with_blocked(blocked, f"import trainable_infra.{package}; print('ok')")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_demo_command_runs():
    result = subprocess.run(
        [sys.executable, "-m", "trainable_infra", "demo", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "--weight-bits" in result.stdout
