"""The quantizer kinds that `quantizer_kernels.py` and `keras_quantizer_kernels.py` time, in either backend.

One 8-bit configuration per kind (weights per-channel over `CHANNELS` channels, activations per-tensor); the class
for a backend comes from the library's resolver, given that backend's base quantizer class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainable_infra import (
    QuantizationMethod,
    QuantizationTarget,
    TrainableQuantizerActivationConfig,
    TrainableQuantizerWeightsConfig,
    TrainingMethod,
    get_trainable_quantizer_class,
)

SIZES = {"1M": 1 << 20, "16M": 1 << 24}
CHANNELS = 256


def quantizers(method: TrainingMethod, base_class: type, channel_axis: int) -> dict[str, tuple[Any, bool]]:
    """{kind: (quantizer, is_weight)} for one training method, built from `base_class`'s quantizers."""
    sym, uni = QuantizationMethod.SYMMETRIC, QuantizationMethod.UNIFORM
    weights, activations = QuantizationTarget.Weights, QuantizationTarget.Activation
    threshold = {"threshold": np.full(CHANNELS, 3.0)}
    ranges = {"range_min": np.full(CHANNELS, -3.0), "range_max": np.full(CHANNELS, 3.0)}
    kinds = {
        "weights symmetric per-channel": (
            weights, sym, TrainableQuantizerWeightsConfig(sym, 8, threshold, True, channel_axis, True, 2**-16)),
        "weights uniform per-channel": (
            weights, uni, TrainableQuantizerWeightsConfig(uni, 8, ranges, True, channel_axis, True, 2**-16)),
        "activations symmetric": (
            activations, sym, TrainableQuantizerActivationConfig(sym, 8, {"threshold": 3.0, "is_signed": True}, True,
                                                                 2**-16)),
        "activations uniform": (
            activations, uni, TrainableQuantizerActivationConfig(uni, 8, {"range_min": -3.0, "range_max": 3.0}, True,
                                                                 2**-16)),
    }
    return {
        kind: (get_trainable_quantizer_class(target, method, quant_method, base_class)(config), target is weights)
        for kind, (target, quant_method, config) in kinds.items()
    }
