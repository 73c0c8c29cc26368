"""Command line: `python -m trainable_infra demo`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command named on the command line; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m trainable_infra", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="quantization-aware training of a small model on the digits data")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print("demo arrives with the model API (quantize_model); the tests run today: see README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
