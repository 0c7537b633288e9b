"""The ``rgfusion`` command: one argparse tree, each component registers its subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from rgfusion.configs import ConfigError

# Modules that each expose ``register(subparsers)``. They import torch, DeepSpeed, Ray and MLflow
# only inside their commands, so building the parser (and `rgfusion data ...`) stays light.
COMMAND_MODULES = (
    "rgfusion.datasets.cli",
    "rgfusion.trainer.commands",
    "rgfusion.cluster.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rgfusion", description=__doc__)
    # The deepspeed launcher inserts --local_rank=N before the subcommand; DistEnv reads it.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rgfusion: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
