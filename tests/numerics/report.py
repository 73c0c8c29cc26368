"""The parity report: the worst error of every case, per backend and backend pair, in units of Δ.

    python -m tests.numerics.report [-k SUBSTRING]

Columns (forward outputs on `cases.forward_inputs`, in eval and training mode; gradients on
`cases.gradient_inputs`). Differences are in units of Δ away from rounding ties; at a tie, a difference of one
step is allowed (rules 2 and 3) and counted instead:

    <b>~ref       worst |y - reference| / Δ (rule 2)
    <b>~ref ties  outputs one step from the reference at a rounding tie
    <b>~ref ulp   worst |y - reference| in float32 ulps of the output
    K~T           worst |y_keras - y_pytorch| / Δ (rule 3); "K~T ties" as above
    K~T dx        input-gradient elements that differ between the backends
    K~T dθ        worst relative difference of the LSQ parameter gradients between the backends
    <b>~inf       worst |eval - convert2inferable()| / Δ anywhere (rule 1: 0)
    <b>~op        worst |y - the framework's fused op built from the parameters| / Δ; "<b>~op ties" as above

where <b> is K (Keras) or T (PyTorch; T2 is PyTorch on CUDA where a GPU is present).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys

import numpy as np

from tests.numerics.adapters import ADAPTERS, backend_names
from tests.numerics.cases import (
    CASES,
    TIE_WINDOW,
    Case,
    case_params,
    forward_inputs,
    gradient_inputs,
    reference_forward,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import rule2_errors

SHORT = {"keras": "K", "pytorch": "T", "pytorch-cuda": "T2"}


def _steps(a: np.ndarray, b: np.ndarray, delta: np.ndarray) -> float:
    return float((np.abs(a.astype(np.float64) - b) / delta).max(initial=0.0))


def case_row(case: Case, backends: list[str]) -> dict[str, str]:
    """The report's cells for one case."""
    params = case_params(case)
    x, xg, dy = forward_inputs(case, params), gradient_inputs(case, params), upstream_gradient(case)
    row: dict[str, str] = {}
    outputs, grads = {}, {}
    for name in backends:
        adapter = ADAPTERS[name]
        built = adapter.build(case, params)
        grid = reference_grid(case, params, adapter.rounding)
        reference = reference_forward(case, params, x, adapter.rounding)
        ys = [adapter.forward(built, x, training) for training in (False, True)]
        errors = [rule2_errors(y, reference, grid.steps(x), grid.delta, adapter.ulps_for(case), TIE_WINDOW) for y in ys]
        op = rule2_errors(ys[0], adapter.oracle(case, params, x), grid.steps(x), grid.delta, adapter.ulps_for(case),
                          TIE_WINDOW)
        key = SHORT[name]
        row[f"{key}~ref"] = f"{max(e.steps_away for e in errors):.2g}"
        row[f"{key}~ref ties"] = str(max(e.tie_steps for e in errors))
        row[f"{key}~ref ulp"] = f"{max(e.ulps for e in errors):.3g}"
        row[f"{key}~inf"] = f"{_steps(ys[0], adapter.inferable(built, x), grid.delta):.2g}"
        row[f"{key}~op"] = f"{op.steps_away:.2g}"
        row[f"{key}~op ties"] = str(op.tie_steps)
        outputs[name], grads[name] = ys, adapter.gradients(built, xg, dy)
    grid = reference_grid(case, params)
    for a, b in itertools.combinations(backends, 2):
        pair = f"{SHORT[a]}~{SHORT[b]}"
        errors = [rule2_errors(ya, yb, grid.steps(x), grid.delta, 0, TIE_WINDOW)
                  for ya, yb in zip(outputs[a], outputs[b], strict=True)]
        row[pair] = f"{max(e.steps_away for e in errors):.2g}"
        row[f"{pair} ties"] = str(max(e.tie_steps for e in errors))
        row[f"{pair} dx"] = str(int((grads[a]["input"] != grads[b]["input"]).sum()))
        relative = [np.abs(grads[a][n] - grads[b][n]) / np.maximum(np.abs(grads[b][n]), 1e-6)
                    for n in case.learnable_names]
        row[f"{pair} dθ"] = f"{max(float(r.max()) for r in relative):.2g}" if relative else "-"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the cases whose id contains this")
    args = parser.parse_args(argv)
    # mct-quantizers logs each range it widens to include zero; the table says what matters here.
    logging.getLogger("MCT Quantizers").setLevel(logging.ERROR)
    backends = backend_names(include_missing=False)
    cases = [case for case in CASES if args.k in case.id]
    rows = [(case.id, case_row(case, backends)) for case in cases]
    if not rows:
        print(f"no case id contains {args.k!r}")
        return 1
    columns = list(rows[0][1])
    width = max(len(case_id) for case_id, _ in rows)
    print(f"{'case':{width}}  " + "  ".join(f"{c:>10}" for c in columns))
    for case_id, row in rows:
        print(f"{case_id:{width}}  " + "  ".join(f"{row[c]:>10}" for c in columns))
    print(f"\n{len(rows)} cases, backends {', '.join(backends)}; worst over all cases:")
    for column in columns:
        values = [float(row[column]) for _, row in rows if row[column] != "-"]
        if values:
            print(f"  {column:12} {max(values):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
