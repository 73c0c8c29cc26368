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
DQA_CASE_PARAMS = [pytest.param(case, id=case.id) for case in CASES if case.is_dqa]


def backend_case_params(cases, known_bug=lambda backend, case: None, raises: type = AssertionError) -> list:
    """(backend, case) parameters; `known_bug(backend, case)` returns the reason of a reported bug that makes
    the case fail with `raises` (marked xfail(strict=True), so that a fix is noticed), or None."""
    params = []
    for backend in backend_names():
        adapter = ADAPTERS[backend]
        for case in cases:
            marks = [pytest.mark.skipif(not adapter.available(), reason=f"{backend}: {adapter.module} is missing")]
            reason = known_bug(backend, case)
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason, raises=raises))
            params.append(pytest.param(backend, case, id=f"{backend}-{case.id}", marks=marks))
    return params
