"""trainable-infra: quantization-aware training with trainable quantizers for Keras 3 and PyTorch.

This top-level package is framework-neutral (numpy and mct-quantizers only). The backends live in
`trainable_infra.keras_backend` and `trainable_infra.pytorch_backend`.
"""

import contextlib
import sys

# triton's LLVM aborts the process when it loads after TensorFlow's, and mct-quantizers (imported below) loads
# TensorFlow whenever it is installed. Where triton is installed (CUDA builds of torch ship it) and TensorFlow is not
# loaded yet, triton is loaded first, so that torch.compile and the quantizers' Triton kernels work beside
# TensorFlow; it loads neither torch nor numpy. Once TensorFlow is loaded, triton must not be.
if "tensorflow" not in sys.modules:
    with contextlib.suppress(ImportError):
        import triton  # noqa: F401

from trainable_infra.common import *  # noqa: F403
from trainable_infra.common import __all__ as _common_all

__version__ = "0.1.0"
__all__ = [*_common_all, "__version__"]
