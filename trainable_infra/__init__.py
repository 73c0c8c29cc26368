"""trainable-infra: quantization-aware training with trainable quantizers for Keras 3 and PyTorch.

This top-level package is framework-neutral (numpy and mct-quantizers only). The backends live in
`trainable_infra.keras_backend` and `trainable_infra.pytorch_backend`.
"""

from trainable_infra.common import *  # noqa: F403
from trainable_infra.common import __all__ as _common_all

__version__ = "0.1.0"
__all__ = [*_common_all, "__version__"]
