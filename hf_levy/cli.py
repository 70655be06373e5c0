"""The ``hf-levy`` command. Training, comparison and diagnostics subcommands arrive with the recipes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hf_levy import __version__


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="hf-levy",
        description=(
            "hf_levy: fine-tune Hugging Face models with large batches plus Hessian-shaped α-stable "
            "gradient noise. Use hf_levy.LevyTrainer / LevyConfig from Python (see README.md)."
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"hf-levy {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
