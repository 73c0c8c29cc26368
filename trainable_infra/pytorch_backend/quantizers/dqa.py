"""DQA quantizers (DNN Quantization with Attention): a learned mixture of b, 2b and 4b-bit quantizations in
training, annealed to b bits (`trainable_infra.common.dqa`).

Each candidate is the straight-through fake quantization of `SymmetricGrid` / `UniformGrid` at its own bit width
on the same fixed threshold or range; eval mode and `convert2inferable()` are the grid's b-bit quantizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trainable_infra.common.dqa import DQAQuantizer
from trainable_infra.common.enums import TrainingMethod, VariableGroup
from trainable_infra.common.mct import QuantizationMethod, QuantizationTarget, mark_quantizer
from trainable_infra.common.numerics import symmetric_int_range
from trainable_infra.common.schedules import LinearAnnealing
from trainable_infra.pytorch_backend.base_quantizer import (
    BasePytorchActivationTrainableQuantizer,
    BasePytorchWeightTrainableQuantizer,
)
from trainable_infra.pytorch_backend.quantizers.fake_quant import STEFakeQuantize, divide
from trainable_infra.pytorch_backend.quantizers.grid import SymmetricGrid, UniformGrid, register_variable

_SYMMETRIC_METHODS = [QuantizationMethod.SYMMETRIC, QuantizationMethod.POWER_OF_TWO]


class _DQA(DQAQuantizer):
    """The mixture in training; the grid's b-bit quantizer in eval mode."""

    def __init__(self, quantization_config: Any, freeze_quant_params: bool = False,
                 temperature_schedule: LinearAnnealing | dict | None = None):
        super().__init__(quantization_config, freeze_quant_params)
        self.init_dqa(temperature_schedule)

    def initialize_quantization(self, tensor_shape: Any, name: str, layer: Any) -> None:
        """Create the grid's variables, the logits `<name>_attention` and the step counter `<name>_step`."""
        super().initialize_quantization(tensor_shape, name, layer)
        logits = register_variable(layer, f"{name}_attention", np.zeros(3), trainable=True)
        self.add_quantizer_variable("attention", logits, VariableGroup.WEIGHTS)
        self._attributes["attention"] = f"{name}_attention"
        # A buffer, not a parameter: no optimizer sees it, state_dict keeps it, .to(device) moves it.
        layer.register_buffer(f"{name}_step", torch.zeros((), dtype=torch.int64, device=logits.device))
        self._step_attribute = f"{name}_step"
        self._penalties = torch.tensor(self.penalties, dtype=torch.float64)
        self._candidate_ranges = [self.int_range(bits) for bits in self.candidate_bits]

    @property
    def attention_logits(self) -> torch.nn.Parameter:
        """The three learned logits ℓ, as the layer holds them now."""
        return getattr(self._layer, self._attributes["attention"])

    @property
    def step(self) -> torch.Tensor:
        """The step counter (int64 buffer): training-mode calls made while gradients are recorded."""
        return getattr(self._layer, self._step_attribute)

    def current_step(self) -> int:
        return int(self.step)

    def current_logits(self) -> np.ndarray:
        return self.attention_logits.detach().cpu().double().numpy()

    def _attention(self) -> torch.Tensor:
        """α = softmax(ℓ - r/T) at the counter's step, computed on the device (no host synchronisation)."""
        step = self.step
        temperature = self.temperature_schedule(step.double(), torch.clamp)
        penalties = self._penalties.to(step.device)
        # r = 0 (the b-bit candidate) gets no penalty, also at T = 0 where r/T would be 0/0.
        penalty = torch.where(penalties > 0, penalties / temperature, 0.0)
        # At T = 0 the wider candidates get -inf and softmax gives exactly (1, 0, 0).
        logits = self.attention_logits
        return torch.softmax(logits - penalty.to(logits.dtype), dim=0)

    def __call__(self, inputs: torch.Tensor, training: bool) -> torch.Tensor:
        """Fake-quantize `inputs`: the attention-weighted candidates in training, b bits in eval mode."""
        if not training:
            delta, zero_point = self.grid()
            return self.fake_quantize(inputs, delta, zero_point)
        alpha = self._attention()
        if torch.is_grad_enabled():
            # Counted after reading: the first training step runs at t = 0.
            self.step.add_(1)
        # The mixture is computed in float32 (or float64), as each candidate's grid is.
        work = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        output = None
        for weight, (delta, zero_point, low, high, q_min, q_max) in zip(alpha, self.candidate_grids(), strict=True):
            q = STEFakeQuantize.apply(work, delta, zero_point, low, high, self.axis, self.view, q_min, q_max)
            # Summed from the b-bit term: starting from 0 would turn its -0.0 into +0.0.
            output = weight * q if output is None else output + weight * q
        return output.to(inputs.dtype)


class _DQASymmetric(_DQA, SymmetricGrid):
    def int_range(self, bits: int) -> tuple[int, int]:
        """(q_min, q_max) of the candidate with `bits` bits."""
        return symmetric_int_range(bits, self.params.signed)

    def candidate_grids(self) -> list[tuple]:
        """(Δ, zero point, low, high, q_min, q_max) of each candidate: the same threshold, Δ = t / 2^(bits - s)."""
        t = self.effective_threshold().detach()
        signed = int(self.params.signed)
        grids = []
        for bits, (q_min, q_max) in zip(self.candidate_bits, self._candidate_ranges, strict=True):
            delta = divide(t, float(2 ** (bits - signed)))
            d = delta.view(self.view)
            grids.append((delta, torch.zeros_like(delta, dtype=torch.int32), d * q_min, d * q_max, q_min, q_max))
        return grids


class _DQAUniform(_DQA, UniformGrid):
    def int_range(self, bits: int) -> tuple[int, int]:
        """(0, 2^bits - 1): the candidate's integer grid."""
        return 0, 2**bits - 1

    def candidate_grids(self) -> list[tuple]:
        """(Δ, zero point, low, high, q_min, q_max) of each candidate, on the same range adjusted to include zero at
        the candidate's bit width."""
        low, high = self.effective_range()
        grids = []
        for q_min, q_max in self._candidate_ranges:
            delta = divide(high - low, float(q_max))
            zero_point = torch.round(divide(-low, delta)).clamp(0, q_max).to(torch.int32)
            d, z = delta.view(self.view), zero_point.view(self.view)
            grids.append((delta, zero_point, -z * d, (q_max - z) * d, q_min, q_max))
        return grids


@mark_quantizer(QuantizationTarget.Weights, _SYMMETRIC_METHODS, TrainingMethod.DQA)
class DQASymmetricWeightQuantizer(_DQASymmetric, BasePytorchWeightTrainableQuantizer):
    """Symmetric / power-of-two weight quantizer trained by DQA on a fixed threshold (per-channel or per-tensor).

    Args:
        quantization_config: a `TrainableQuantizerWeightsConfig` with weights_n_bits in 2..8.
        freeze_quant_params: accepted for a uniform signature; the threshold is fixed anyway.
        temperature_schedule: a `LinearAnnealing` of the temperature over training steps, ending at 0
            (default: 1 to 0 over steps 0..10000).
    """


@mark_quantizer(QuantizationTarget.Weights, [QuantizationMethod.UNIFORM], TrainingMethod.DQA)
class DQAUniformWeightQuantizer(_DQAUniform, BasePytorchWeightTrainableQuantizer):
    """Uniform weight quantizer trained by DQA on a fixed range (arguments as `DQASymmetricWeightQuantizer`)."""


@mark_quantizer(QuantizationTarget.Activation, _SYMMETRIC_METHODS, TrainingMethod.DQA)
class DQASymmetricActivationQuantizer(_DQASymmetric, BasePytorchActivationTrainableQuantizer):
    """Symmetric / power-of-two activation quantizer (signed or unsigned) trained by DQA on a fixed threshold."""


@mark_quantizer(QuantizationTarget.Activation, [QuantizationMethod.UNIFORM], TrainingMethod.DQA)
class DQAUniformActivationQuantizer(_DQAUniform, BasePytorchActivationTrainableQuantizer):
    """Uniform activation quantizer trained by DQA on a fixed range."""

