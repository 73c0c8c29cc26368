"""Options of the whole test suite."""

import contextlib

import pytest

# triton's LLVM aborts the process when it loads after TensorFlow's, and mct-quantizers imports TensorFlow whenever
# it is installed: where triton is installed (the Triton kernels' tests, inductor), it is loaded first.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (real-size models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="real-size model: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
