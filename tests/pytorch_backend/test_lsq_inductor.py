"""LSQ quantizers on channels-last activations: eager gives the same gradients in every mix of memory formats, and
inductor gives the same values and gradients as eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pytorch_backend.test_quantizers import SYM, UNI, Case, build, reference
from trainable_infra import TrainingMethod

# Per-tensor activations, whose parameter gradient is a reduction over the whole (channels-last) tensor.
INDUCTOR_CASES = [
    Case(TrainingMethod.LSQ, SYM, "activation", 8, "signed"),
    Case(TrainingMethod.LSQ, UNI, "activation", 8, "straddling"),
]
SHAPE = (4, 16, 6, 6)


def _inputs(case, params) -> tuple[np.ndarray, np.ndarray]:
    """(x, upstream gradient): x inside and beyond the range, off the rounding ties."""
    rng = np.random.default_rng(3)
    delta = float(reference(case, params, np.zeros(SHAPE, np.float32))["delta"].reshape(-1)[0])
    x = (rng.uniform(-200.0, 200.0, SHAPE) * delta + rng.uniform(-1e-3, 1e-3, SHAPE)).astype(np.float32)
    return x, rng.normal(size=SHAPE).astype(np.float32)


@pytest.mark.parametrize("case", INDUCTOR_CASES, ids=[c.id for c in INDUCTOR_CASES])
@pytest.mark.parametrize(("x_format", "grad_format"), [
    (torch.channels_last, torch.channels_last),
    (torch.channels_last, torch.contiguous_format),
    (torch.contiguous_format, torch.channels_last),
], ids=["both-channels-last", "x-channels-last", "grad-channels-last"])
def test_eager_gradients_do_not_depend_on_memory_format(case, x_format, grad_format):
    """The eager per-tensor sums run over memory order (no copy into NCHW order); the result is the contiguous one."""
    quantizer, _, params = build(case)
    names = ["range_min", "range_max"] if case.method is UNI else ["threshold"]
    variables = [quantizer.get_quantizer_variable(name) for name in names]
    x_np, grad_np = _inputs(case, params)

    def run(x_fmt, grad_fmt):
        for variable in variables:
            variable.grad = None
        x = torch.from_numpy(x_np).contiguous(memory_format=x_fmt).requires_grad_()
        quantizer(x, training=True).backward(torch.from_numpy(grad_np).contiguous(memory_format=grad_fmt))
        return x.grad, [variable.grad.clone() for variable in variables]

    x_grad, grads = run(x_format, grad_format)
    plain_x_grad, plain_grads = run(torch.contiguous_format, torch.contiguous_format)
    assert torch.equal(x_grad, plain_x_grad)
    for name, grad, plain in zip(names, grads, plain_grads, strict=True):
        assert torch.any(plain != 0), f"{case.id}: {name} receives no gradient"
        torch.testing.assert_close(grad, plain, rtol=1e-5, atol=1e-6, msg=f"{case.id}: gradient of {name}")


@pytest.mark.parametrize("case", INDUCTOR_CASES, ids=[c.id for c in INDUCTOR_CASES])
def test_inductor_matches_eager_on_channels_last_activation(case):
    quantizer, _, params = build(case)
    names = ["range_min", "range_max"] if case.method is UNI else ["threshold"]
    variables = [quantizer.get_quantizer_variable(name) for name in names]
    x_np, grad_np = _inputs(case, params)
    grad_out = torch.from_numpy(grad_np).contiguous(memory_format=torch.channels_last)

    def run(fn):
        for variable in variables:
            variable.grad = None
        x = torch.from_numpy(x_np).contiguous(memory_format=torch.channels_last).requires_grad_()
        out = fn(x)
        out.backward(grad_out)
        return out.detach(), x.grad, [variable.grad.clone() for variable in variables]

    eager_out, eager_x_grad, eager_grads = run(lambda x: quantizer(x, training=True))
    compiled = torch.compile(lambda x: quantizer(x, training=True), fullgraph=True)
    out, x_grad, grads = run(compiled)

    assert torch.equal(out, eager_out)
    assert torch.equal(x_grad, eager_x_grad)
    for name, grad, eager_grad in zip(names, grads, eager_grads, strict=True):
        assert torch.any(grad != 0), f"{case.id}: {name} receives no gradient"
        # The eager gradient is pinned to the reference in test_quantizers.py; compiled, the sums run in another
        # order, so they agree up to float32 rounding.
        torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-6)
