"""pytest parameters of the numerics suite: backends (skipped where their framework is missing) and cases."""

from __future__ import annotations

import itertools

import pytest

from tests.numerics.adapters import ADAPTERS, backend_names
from tests.numerics.cases import CASES


def backend_param(name: str):
    adapter = ADAPTERS[name]
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        not adapter.available(), reason=f"{name}: {adapter.module} is not installed"))


BACKENDS = [backend_param(name) for name in backend_names()]
# Every pair of backends, for rule 3 (keras-pytorch; with a GPU also keras-pytorch-cuda, pytorch-pytorch-cuda).
PAIRS = [
    pytest.param((a, b), id=f"{a}-vs-{b}", marks=pytest.mark.skipif(
        not (ADAPTERS[a].available() and ADAPTERS[b].available()), reason=f"{a} and {b} are not both installed"))
    for a, b in itertools.combinations(backend_names(), 2)
]
CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES]
LSQ_CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES if case.is_lsq]
