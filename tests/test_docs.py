"""Every fenced `python` block of docs/*.md and README.md runs, in order per file, in a temporary directory.

A page that uses a backend is skipped when that framework is not installed. No block is excluded: a page's
blocks share one namespace, as a reader running them one after another would.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FRAMEWORKS = {"trainable_infra.pytorch_backend": "torch", "trainable_infra.keras_backend": "tensorflow"}


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_every_page_has_runnable_examples():
    reference_pages = {"api.md", "performance.md"}  # a name list and a results table
    assert all(blocks(page) for page in PAGES if page.name not in reference_pages), "a page without examples"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    code = blocks(page)
    if not code:
        pytest.skip(f"{page.name} has no python block")
    text = "\n".join(code)
    for module, framework in FRAMEWORKS.items():
        if module in text and importlib.util.find_spec(framework) is None:
            pytest.skip(f"{page.name} needs {framework}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    namespace = {"__name__": f"docs.{page.stem}"}
    for index, block in enumerate(code):
        try:
            exec(compile(block, f"{page.name}[block {index}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name}, python block {index} failed: {exc!r}\n{block}") from exc


def test_api_page_is_current():
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    make_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_api)
    assert (ROOT / "docs" / "api.md").read_text() == make_api.render(), "run: python docs/make_api.py"
