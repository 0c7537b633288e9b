"""The ``rgfusion`` command: one argparse tree, each component registers its subcommands."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
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


def entry() -> None:
    """The console script: ``main`` as a process, ended before finalization once torch is loaded."""
    code = main()
    if "torch" in sys.modules:
        exit_before_finalization(code)
    sys.exit(code)


def exit_before_finalization(code: int) -> None:
    """Run the exit handlers (log, MLflow and temp-file flushes), flush stdio, then end the process
    without interpreter finalization. Process groups that DeepSpeed keeps referenced (ZeRO-3's
    hooks hold its engine through autograd) would meet finalization with gloo's threads still
    running, which aborted ranks after a finished run ("terminate called without an active
    exception")."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
