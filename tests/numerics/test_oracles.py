"""Independent oracles: the frameworks' own fake-quant ops, built here directly from a case's parameters.

- PyTorch against `torch.fake_quantize_per_tensor_affine` / `torch.fake_quantize_per_channel_affine` with
  scale Δ and zero point z computed from the parameters by DESIGN.md §4: bit for bit (the CPU path composes
  the kernel's exact IEEE ops, the CUDA path is the kernel).
- Keras against `tf.quantization.fake_quant_with_min_max_vars[_per_channel]` on [Δ·q_min, Δ·q_max] (symmetric)
  or the range widened to zero (uniform; the op nudges it onto the grid itself): within rule 2's ulp budget,
  because the Keras quantizers feed the op mct-quantizers' range (README.md, "Exceptions").
- LSQ symmetric and power-of-two gradients, both backends, against torch's learnable fake-quant ops
  (`torch._fake_quantize_learnable_per_tensor_affine` / `_per_channel_affine`), whose scale is Δ = t/2^(n-s):
  their scale gradient divided by 2^(n-s) is the threshold gradient (the power-of-two rounding of t passes the
  gradient straight through), and `grad_factor` is LSQ's g. Those ops decide "inside the range" on the
  rounded input, the library on the input itself, so the inputs avoid the half step beyond each range end.
  Uniform LSQ is not compared: torch learns (scale, zero point), the library (range_min, range_max).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.numerics.adapters import oracle_grid
from tests.numerics.cases import (
    TIE_WINDOW,
    case_params,
    forward_inputs,
    lsq_num_elements,
    oracle_gradient_inputs,
    reference_grid,
    upstream_gradient,
)
from tests.numerics.compare import assert_rule2, bits
from tests.numerics.params import BACKENDS, CASE_PARAMS, LSQ_CASE_PARAMS
from trainable_infra.common import numerics as nm

LSQ_SYMMETRIC_CASES = [p for p in LSQ_CASE_PARAMS if not p.values[0].is_uniform]


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_framework_fused_op(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x = forward_inputs(case, params)
    ours, oracle = adapter.forward(built, x, False), adapter.oracle(case, params, x)
    what = f"{adapter.name} {case.id}: against the framework's fused op built from the parameters"
    if adapter.ulps_for(case) == 0:
        mismatch = bits(ours) != bits(oracle)
        assert not mismatch.any(), (
            f"{what}: {int(mismatch.sum())} of {mismatch.size} outputs differ; first at x={x[mismatch][0]!r}: "
            f"{ours[mismatch][0]!r} vs {oracle[mismatch][0]!r}")
    else:
        grid = reference_grid(case, params, adapter.rounding)
        assert_rule2(ours, oracle, grid.steps(x), grid.delta, what, ulps=adapter.ulps_for(case),
                     tie_window=TIE_WINDOW)


def _torch_learnable_grads(case, params, x: np.ndarray, dy: np.ndarray) -> dict[str, np.ndarray]:
    """Input and threshold gradients of sum(dy·Q(x)) by torch's learnable fake-quant ops."""
    torch = pytest.importorskip("torch")
    delta, zero_point, _ = oracle_grid(case, params)
    q_min, q_max = case.int_range
    g = nm.lsq_grad_scale(lsq_num_elements(case, x.shape), q_max)
    xt = torch.from_numpy(x).requires_grad_()
    scale = torch.from_numpy(delta).requires_grad_()
    zero = torch.from_numpy(zero_point.astype(np.float32))
    if case.axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xt, scale, zero, q_min, q_max, g)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xt, scale, zero, case.axis % x.ndim, q_min, q_max, g)
    grad_x, grad_scale = torch.autograd.grad(y, [xt, scale], torch.from_numpy(dy))
    steps = 2 ** (case.n_bits - int(case.signed))
    return {"input": grad_x.double().numpy(), "threshold": grad_scale.double().numpy() / steps}


@pytest.mark.parametrize("case", LSQ_SYMMETRIC_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_input_gradient_matches_torch_learnable_op(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x, dy = oracle_gradient_inputs(case, params), upstream_gradient(case)
    ours, oracle = adapter.gradients(built, x, dy)["input"], _torch_learnable_grads(case, params, x, dy)["input"]
    mismatch = ours != oracle
    assert not mismatch.any(), (
        f"{adapter.name} {case.id}: input gradient differs from torch's learnable op at {int(mismatch.sum())} "
        f"elements; first at x={x[mismatch][0]!r}: {ours[mismatch][0]!r} vs {oracle[mismatch][0]!r}")


@pytest.mark.parametrize("case", LSQ_SYMMETRIC_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_threshold_gradient_matches_torch_learnable_op(adapter, case):
    params = case_params(case)
    built = adapter.build(case, params)
    x, dy = oracle_gradient_inputs(case, params), upstream_gradient(case)
    ours = adapter.gradients(built, x, dy)["threshold"]
    oracle = _torch_learnable_grads(case, params, x, dy)["threshold"]
    np.testing.assert_allclose(ours, oracle, rtol=2e-5, atol=2e-6,
                               err_msg=f"{adapter.name} {case.id}: threshold gradient vs torch's learnable op")
