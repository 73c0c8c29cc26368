"""What the DQA quantizers of both backends share: the candidates, the temperature schedule and their config.

DQA (DNN Quantization with Attention, Boukli Hacene et al., 2021) trains with a mixture of the b, 2b and 4b-bit
quantizations of a tensor on one threshold or range, y = Σ α_i·Q_{b_i}(x), α = softmax(ℓ - r/T): three learned
logits ℓ, penalties r_i = log2(b_i/b) = (0, 1, 2) (less where a candidate is capped at 16 bits) and a temperature
T annealed linearly to 0 over the training steps (`LinearAnnealing`). Dividing only the penalty by T, not the
learned logits, makes the schedule decide the end: as T falls the wider candidates' weights vanish whatever was
learned, and at T = 0 the mixture is the b-bit quantizer exactly. Eval mode and `convert2inferable()` always
give the b-bit quantizer: what is deployed.

The maths is `trainable_infra.common.numerics` (`dqa_attention`, `fake_quant_dqa_*`, `dqa_grads_*`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from trainable_infra.common.config import TrainableQuantizerWeightsConfig
from trainable_infra.common.errors import QuantizationConfigError
from trainable_infra.common.numerics import DQA_MAX_BITS, dqa_attention, dqa_candidate_bits, dqa_penalties
from trainable_infra.common.schedules import LinearAnnealing

# Steps of the default schedule: set the schedule to your run's length (`set_dqa_temperature_schedule`).
DEFAULT_T_END = 10_000


def default_temperature_schedule() -> LinearAnnealing:
    """T from 1 at step 0 to 0 at step 10000 (with b <= 4 the candidates start weighted 0.67, 0.24, 0.09)."""
    return LinearAnnealing(t_start=0, t_end=DEFAULT_T_END, initial_value=1.0, target_value=0.0)


def temperature_schedule_for(total_steps: int, anneal_fraction: float = 0.7,
                             initial_temperature: float = 1.0) -> LinearAnnealing:
    """A schedule for a run of `total_steps` training steps: T from `initial_temperature` at step 0 to 0 after
    `anneal_fraction` of the run, so that the rest of the run trains the b-bit quantizers that are deployed.

    Example:
        >>> temperature_schedule_for(430)
        LinearAnnealing(t_start=0, t_end=301, initial_value=1.0, target_value=0.0)
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
        raise QuantizationConfigError(f"total_steps must be an int >= 1, got {total_steps!r}")
    fraction = float(anneal_fraction) if isinstance(anneal_fraction, (int, float, np.floating)) else None
    if fraction is None or not 0 < fraction <= 1:
        raise QuantizationConfigError(f"anneal_fraction must be a number in (0, 1], got {anneal_fraction!r}")
    return check_temperature_schedule(LinearAnnealing(
        t_start=0, t_end=max(round(fraction * int(total_steps)), 1), initial_value=initial_temperature,
        target_value=0.0,
    ))


def check_temperature_schedule(value: Any) -> LinearAnnealing:
    """`value` (a `LinearAnnealing`, its `to_dict()`, or None for the default) as a schedule DQA can end with."""
    if value is None:
        return default_temperature_schedule()
    if isinstance(value, Mapping):
        value = LinearAnnealing.from_dict(value)
    if not isinstance(value, LinearAnnealing):
        raise QuantizationConfigError(
            f"temperature_schedule must be a LinearAnnealing, a dict made by its to_dict() or None (the default "
            f"{default_temperature_schedule()!r}), got {value!r}"
        )
    if value.initial_value <= 0:
        raise QuantizationConfigError(
            f"temperature_schedule.initial_value must be > 0 (the starting temperature), got {value.initial_value!r}"
        )
    if value.target_value != 0:
        raise QuantizationConfigError(
            "temperature_schedule.target_value must be 0.0: at temperature 0 the mixture is the b-bit quantizer "
            f"that eval mode and convert2inferable() give; got {value.target_value!r}"
        )
    return value


class DQAQuantizer:
    """Framework-neutral part of a DQA quantizer (a mixin before the backend's grid and base classes).

    The grid (threshold or range) is fixed, as in STE; the three attention logits are trained, registered in
    `VariableGroup.WEIGHTS` (like MCT's GPTQ auxiliary variables: they shape the weights' training, they are not
    quantization parameters, so `freeze_quant_params` and `freeze_quantizers` leave them alone). A step counter
    beside them on the layer counts the training-mode calls and places the quantizer on its schedule; it is
    saved with the layer (PyTorch `state_dict`, Keras `.keras`), so training resumes at the same temperature.
    """

    learnable_params = False  # the grid's threshold or range

    def init_dqa(self, temperature_schedule: Any) -> None:
        """Validate the bit width and the schedule (called by `__init__` after the base class)."""
        config = self.quantization_config
        if isinstance(config, TrainableQuantizerWeightsConfig):
            name, n_bits = "weights_n_bits", config.weights_n_bits
        else:
            name, n_bits = "activation_n_bits", config.activation_n_bits
        if n_bits > DQA_MAX_BITS:
            raise QuantizationConfigError(
                f"{type(self).__name__}: {name} must be in 2..{DQA_MAX_BITS} for DQA (its candidates are b, 2b and "
                f"4b bits, at most 16), got {n_bits}"
            )
        self.candidate_bits = dqa_candidate_bits(n_bits)
        self.penalties = dqa_penalties(n_bits)
        self.temperature_schedule = check_temperature_schedule(temperature_schedule)

    def set_temperature_schedule(self, schedule: LinearAnnealing | Mapping[str, Any]) -> None:
        """Replace the temperature schedule (before training: a traced Keras step keeps the one it was traced with,
        so use the backend's `set_dqa_temperature_schedule(model, schedule)`, which also retraces)."""
        if schedule is None:
            raise QuantizationConfigError(
                "schedule must be a LinearAnnealing or a dict made by its to_dict(), got None"
            )
        self.temperature_schedule = check_temperature_schedule(schedule)

    def current_step(self) -> int:
        """The number of training-mode calls so far (the schedule's step)."""
        raise NotImplementedError

    def current_logits(self) -> np.ndarray:
        """The three attention logits ℓ now (float64)."""
        raise NotImplementedError

    def temperature(self) -> float:
        """The temperature T the next training-mode call uses."""
        return float(self.temperature_schedule(self.current_step()))

    def attention(self) -> np.ndarray:
        """The weights α of the b, 2b and 4b-bit candidates the next training-mode call uses."""
        return dqa_attention(self.current_logits(), self.temperature(), self.candidate_bits[0])

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, with the current temperature schedule as a dict."""
        config = super().get_config()
        config["temperature_schedule"] = self.temperature_schedule.to_dict()
        return config


def set_temperature_schedules(quantizers: Iterable[Any], schedule: LinearAnnealing | Mapping[str, Any]) -> int:
    """Give every DQA quantizer among a model's `quantizers` the temperature `schedule`; returns how many there are.

    Raises:
        QuantizationConfigError: none of them is a DQA quantizer.
    """
    found = [quantizer for quantizer in quantizers if isinstance(quantizer, DQAQuantizer)]
    if not found:
        raise QuantizationConfigError(
            "model has no DQA quantizers; make it with quantize_model and "
            "QATConfig(weight_training_method=TrainingMethod.DQA)"
        )
    for quantizer in found:
        quantizer.set_temperature_schedule(schedule)
    return len(found)
