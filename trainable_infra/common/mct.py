"""The names trainable-infra shares with mct-quantizers, imported in one place.

`QuantizationMethod`, `QuantizationTarget` and `mark_quantizer` are mct-quantizers' own objects (not copies),
so a quantizer marked with either package's decorator, or a config built with either package's enum,
means the same thing to both.
"""

from mct_quantizers import BaseInferableQuantizer, QuantizationMethod, QuantizationTarget, mark_quantizer

__all__ = ["BaseInferableQuantizer", "QuantizationMethod", "QuantizationTarget", "mark_quantizer"]
