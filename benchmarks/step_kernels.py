"""Kernels per training step (forward + backward) of the models in `gpu_check.py`, on the path CUDA takes.

Eager QAT on a GPU is bound by the CPU issuing kernels (docs/performance.md), so the count of kernels a step
launches is what the Triton path cuts. This script counts them without a GPU: the quantizers' Triton kernels run
under Triton's interpreter and every Triton launch and every torch op that is not a view, an allocation or a
dtype-preserving copy counts as one kernel, as the same calls launch one on CUDA. The optimizer step is left out
(one multi-tensor kernel group on CUDA). The input is small (batch 2, 32x32): the counts do not depend on it.

    python benchmarks/step_kernels.py
    python benchmarks/step_kernels.py --models cnn7 --ops     # also the kernels by name
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import triton  # noqa: F401  - before TensorFlow (which mct-quantizers loads): triton's LLVM aborts after it

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from quantizer_kernels import interpreted_kernels
from step_overhead import float_cnn, resnet18
from torch import nn

from trainable_infra import QATConfig, TrainingMethod
from trainable_infra.pytorch_backend import quantize_model
from trainable_infra.pytorch_backend.quantizers import triton_kernels

MODELS = {"resnet18": resnet18, "cnn7": float_cnn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--ops", action="store_true", help="also print the kernels of each step by name")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; Triton kernels under the interpreter; kernels per forward / per step "
          "(forward + backward, no optimizer)")
    for name in args.models:
        torch.manual_seed(0)
        float_model = MODELS[name]()
        x = torch.randn(2, 3, 32, 32)
        y = torch.randint(0, 10, (2,))
        models = {"float": float_model}
        for method in ("STE", "LSQ"):
            config = QATConfig(weight_training_method=TrainingMethod[method],
                               activation_training_method=TrainingMethod[method])
            models[method] = quantize_model(float_model, config, [x], progress=False)
        with triton_kernels.force_interpreter():
            for label, model in models.items():
                model.train()

                def forward(model=model, x=x):
                    return model(x)

                def step(model=model, x=x, y=y):
                    model.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(model(x), y).backward()

                step()  # the kernels are decorated on first use
                forward_kernels, step_kernels = interpreted_kernels(forward), interpreted_kernels(step)
                print(f"{name:9s} {label:6s} {len(forward_kernels):5d} / {len(step_kernels):5d}")
                if args.ops:
                    print("    " + ", ".join(f"{op} x{n}" for op, n in collections.Counter(step_kernels).most_common()))


if __name__ == "__main__":
    main()
