"""The README's two commands stay true: CI runs the test command verbatim, and the Python example runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = (block.strip() for block in readme_blocks("bash")[:2])
    assert demo.endswith("python -m trainable_infra demo")
    assert "pytest" in tests
    assert demo.startswith("pip install torch==2.13.0")
    assert tests.startswith("pip install torch==2.13.0")


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = readme_blocks("bash")[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_python_example_runs():
    pytest.importorskip("torch")
    from mct_quantizers import PytorchQuantizationWrapper

    (example,) = readme_blocks("python")
    namespace = {"__name__": "readme"}
    exec(compile(example, "README.md", "exec"), namespace)  # the example asserts its own promise
    wrapped = [m for m in namespace["inference_model"].modules() if isinstance(m, PytorchQuantizationWrapper)]
    assert len(wrapped) == 2
