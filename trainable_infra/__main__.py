"""Command line: `python -m trainable_infra demo [--backend torch|keras] [--weight-bits 4] ...`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

BACKENDS = {"torch": "trainable_infra.pytorch_backend.demo", "keras": "trainable_infra.keras_backend.demo"}


def default_backend() -> str:
    """torch when PyTorch is installed (also when both are), else keras."""
    return "torch" if importlib.util.find_spec("torch") is not None else "keras"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m trainable_infra`."""
    parser = argparse.ArgumentParser(prog="python -m trainable_infra")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="float training, PTQ and QAT of a small CNN on scikit-learn's digits, then save, reload, convert, export",
    )
    demo.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                      help="framework to run on (default: torch if installed, else keras)")
    demo.add_argument("--weight-bits", type=int, default=4, help="weight bit width, 2..16 (default 4)")
    demo.add_argument("--activation-bits", type=int, default=8, help="activation bit width, 2..16 (default 8)")
    demo.add_argument("--method", choices=["STE", "LSQ", "DQA"], default="STE",
                      help="training method of weights and activations (default STE)")
    demo.add_argument("--no-fold-batch-norm", dest="fold_batch_norm", action="store_false",
                      help="keep BatchNorm as a float layer instead of folding it into the convolution before it")
    demo.add_argument("--epochs", type=int, default=10, help="QAT epochs (default 10)")
    demo.add_argument("--float-epochs", type=int, default=15, help="float training epochs (default 15)")
    demo.add_argument("--output", default=None, help="directory for the saved and exported models (default: temp)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command named on the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("weight_bits", "activation_bits"):
        if not 2 <= getattr(args, name) <= 16:
            parser.error(f"--{name.replace('_', '-')} must be in 2..16, got {getattr(args, name)}")
    for name in ("epochs", "float_epochs"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    args.backend = args.backend or default_backend()
    demo = importlib.import_module(BACKENDS[args.backend])
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
