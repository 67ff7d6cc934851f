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
import math
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
    "distillery.serve.commands",  # serve
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a usage error printed as one line, like every other error (the
    usage itself is one --help away). Subcommand parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="distillery",
        description="Distil big language models into small, fast ones, and run them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and "(default: X)" after every option that has a default and
    does not state it already (flags that are off by default say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "default" not in help_text and action.nargs != 0):
            help_text += " (default: %(default)s)"
        return help_text


def add_command(subparsers, name: str, func, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose help is the first paragraph of `func`'s docstring."""
    doc = inspect.cleandoc(func.__doc__ or "")
    summary = doc.split("\n\n")[0].replace("\n", " ")
    p = subparsers.add_parser(name, help=summary, description=doc, formatter_class=HelpFormatter, **kwargs)
    # "tokenizer train" out of "distillery tokenizer train", for the error lines
    p.set_defaults(func=func, command_name=p.prog.split(" ", 1)[-1])
    return p


def json_safe(obj: Any) -> Any:
    """`obj` as strict JSON values: NaN and infinities become null, with "<key>_reason" beside them
    in a mapping (JSON has no NaN; Python's json would write a bare NaN that other parsers reject);
    tensors and numpy values become numbers and lists; paths and other objects their text."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        safe: dict[str, Any] = {}
        for key, value in obj.items():
            safe[str(key)] = json_safe(value)
            if isinstance(value, float) and not math.isfinite(value) or _is_nonfinite_scalar(value):
                safe[f"{key}_reason"] = f"not a finite number ({float(value)})"
        return safe
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch tensors, numpy arrays and scalars
        return json_safe(obj.tolist())
    return str(obj)


def _is_nonfinite_scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or not hasattr(value, "tolist"):
        return False
    item = value.tolist()
    return isinstance(item, float) and not math.isfinite(item)


def print_json(obj: Any) -> None:
    """Print `obj` as strict JSON (see `json_safe`)."""
    json.dump(json_safe(obj), sys.stdout, indent=2, ensure_ascii=False, allow_nan=False)
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help, --version
            raise
        return 2  # a usage error, already printed as one line
    if extras:  # argparse would blame "distillery", not the command whose options they are not
        flags = [a for a in extras if a.startswith("-")]
        what = f"unrecognized option{'s' * (len(flags) > 1)} {' '.join(flags)}" if flags else \
            f"unexpected argument{'s' * (len(extras) > 1)} {' '.join(extras)}"
        print(f"distillery {_name(args)}: error: {what}; see distillery {_name(args)} --help.", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except DistilleryError as e:
        print(f"distillery {_name(args)}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        # Sizes the machine cannot hold (a batch of a billion): the user's to lower, not a bug.
        print(f"distillery {_name(args)}: error: out of memory ({_first_line(e)}); lower the batch size, the "
              "sequence length or the model size.", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, FileNotFoundError) as e:
        # The file system said no (a read-only folder, a file where a folder is needed): the
        # user's to fix, so one line naming the path, not a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"distillery {_name(args)}: error: {where}{e.strerror or e}; check the path and its permissions.",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`distillery ... | head`): stop quietly, as Unix tools do. Output
        # still buffered would fail again at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation: Python's MemoryError, torch's CPU allocator or CUDA out of memory."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _first_line(error: BaseException) -> str:
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _name(args: argparse.Namespace) -> str:
    return getattr(args, "command_name", None) or args.command


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distillery")
    except PackageNotFoundError:
        return "dev"


if __name__ == "__main__":
    sys.exit(main())
