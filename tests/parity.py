"""Comparisons shared by the backends' parity tests (DESIGN.md §4 rule 2).

They live in `tests.numerics.compare`, beside the shared numerics suite; this module keeps their old names.
"""

from __future__ import annotations

from tests.numerics.compare import TIE_TOLERANCE, ULPS, assert_rule2, near_ties, probe_inputs

__all__ = ["TIE_TOLERANCE", "ULPS", "assert_rule2", "near_ties", "probe_inputs"]
