"""The `distillery` command line.

Each subsystem registers its subcommands in its own `commands.py` (a `register(subparsers)`
function); every subcommand is a plain function taking the parsed arguments. A user's mistake
(`DistilleryError`) prints one line to stderr and exits with status 2; argparse's own usage
errors exit 2 too.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from typing import Any

from distillery.models.common import DistilleryError

COMMAND_MODULES = [
    "distillery.pipelines.commands",  # generate, fill-mask, embed, info
    "distillery.tokenizer.commands",  # tokenizer train
    "distillery.distill.commands",  # prepare, student
    "distillery.distill.train_commands",  # train, distill, demo
    "distillery.evaluate.commands",  # eval, glue, finetune, card
    "distillery.generation.commands",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Distil big language models into small, fast ones, and run them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def add_command(subparsers, name: str, func, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose help is the first paragraph of `func`'s docstring."""
    doc = inspect.cleandoc(func.__doc__ or "")
    summary = doc.split("\n\n")[0].replace("\n", " ")
    p = subparsers.add_parser(name, help=summary, description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    p.set_defaults(func=func)
    return p


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DistilleryError as e:
        print(f"distillery {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`distillery ... | head`): stop quietly, as Unix tools do. Output
        # still buffered would fail again at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distillery")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
