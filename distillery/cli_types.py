"""Command-line argument types, and the one way commands write an output folder.

Every number a command takes has its true range here, checked when the command line is parsed,
so no command reaches its code with a value it cannot use. A value out of range raises
argparse.ArgumentTypeError with one sentence; argparse prints it after the option's name
("argument --batch-size: must be a whole number of at least 1, not '0'.") and exits with status 2.
Path types say what must be there: an existing file, an existing folder, or a place to write.

An output folder is written beside its final place and swapped in at the end (`OutputFolder`),
so a failure or Ctrl-C leaves the old contents as they were, and one that already holds a model,
tokenizer, data or run is replaced only when the user passes --overwrite. A long, resumable job
(`train`, `distill`, `demo`) is written beside its folder under a fixed name, `.NAME.overwrite`,
which --overwrite --resume continues after a kill.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from distillery.models.common import DistilleryError

# numpy's legacy seeding (np.random.seed, which transformers' set_seed also calls) takes 32 bits.
MAX_SEED = 2**32 - 1
# Larger counts than this are typos (or attacks), not runs: they would overflow a tensor size.
MAX_COUNT = 2**31 - 1
# The largest vocabulary a tokenizer may be trained to: real ones stop near 256k, and the trainer
# allocates for the size asked before it reads anything (2**46 ids abort the process).
MAX_VOCAB_SIZE = 2**20


# ------------------------------------------------------------------------------------------------
# Numbers


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}.") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}.") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}.")
    return value


def int_range(low: int, high: int = MAX_COUNT, meaning: str = "") -> Callable[[str], int]:
    """A type for whole numbers in [low, high]; `meaning` (e.g. "0: all") is added to the error."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if not low <= value <= high:
            bounds = f"of at least {low}" if high == MAX_COUNT else f"from {low} to {high}"
            extra = f" ({meaning})" if meaning else ""
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}{extra}, not {text!r}.")
        return value

    parse.__name__ = f"int_from_{low}"
    return parse


def float_range(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A type for finite numbers between `low` and `high` (each bound included unless open)."""

    def parse(text: str) -> float:
        value = _parse_float(text)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {_describe_range(low, high, low_open, high_open)}, "
                                             f"not {text!r}.")
        return value

    parse.__name__ = "number"
    return parse


def _describe_range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        if low == 0:
            return "a number above 0" if low_open else "a number of 0 or more"
        return f"a number above {low:g}" if low_open else f"a number of at least {low:g}"
    if low == -math.inf:
        return f"a number below {high:g}" if high_open else f"a number of at most {high:g}"
    return (f"a number from {low:g} to {high:g}"
            + {(False, False): "", (True, False): f", {low:g} excluded", (False, True): f", {high:g} excluded",
               (True, True): ", both excluded"}[(low_open, high_open)])


positive_int = int_range(1)
positive_int.__doc__ = "1, 2, 3, ... (counts, sizes, steps)."
non_negative_int = int_range(0)
non_negative_int.__doc__ = "0, 1, 2, ... (only where the help says what 0 means)."
seed = int_range(0, MAX_SEED)
seed.__doc__ = "A random seed: 0 to 2**32 - 1."
positive_float = float_range(0.0, low_open=True)
positive_float.__doc__ = "A finite number above 0 (learning rates, temperatures, scales)."
non_negative_float = float_range(0.0)
non_negative_float.__doc__ = "A finite number of 0 or more (weights of losses, weight decay)."
finite_float = float_range()
finite_float.__doc__ = "Any finite number."
probability = float_range(0.0, 1.0)
probability.__doc__ = "A number from 0 to 1, both included (top-p, warm-up ratio)."
learning_rate = float_range(0.0, 1.0, low_open=True)
learning_rate.__doc__ = "An AdamW learning rate: above 0, at most 1 (larger ones only make the weights NaN)."
open_fraction = float_range(0.0, 1.0, low_open=True, high_open=True)
open_fraction.__doc__ = "A number strictly between 0 and 1 (a share that must leave something on each side)."


# ------------------------------------------------------------------------------------------------
# Text and devices


def text(value: str) -> str:
    """A command-line text that is valid Unicode: bytes that are not UTF-8 come to Python as
    lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("holds bytes that are not UTF-8 text; pass UTF-8 text.") from None
    return value


def _not_blank(value: str, fix: str) -> str:
    """UTF-8 text with something in it; otherwise "is empty; `fix`"."""
    if not text(value).strip():
        raise argparse.ArgumentTypeError(f"is empty; {fix}.")
    return value


def non_empty(value: str) -> str:
    """Text that is not empty (an empty value would read as the option left out)."""
    return _not_blank(value, "pass a value or leave the option out")


def device(value: str) -> str:
    """A torch device name this machine has: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        kind = torch.device(value).type
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r} asks for CUDA but no CUDA device is available; use cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r} asks for MPS but it is not available; use cpu.")
    return value


def device_or_auto(value: str) -> str:
    """`auto` (a GPU when there is one, else the CPU) or a device name, as `device`."""
    return value if value == "auto" else device(value)


# ------------------------------------------------------------------------------------------------
# Paths


def _path(value: str) -> Path:
    return Path(_not_blank(value, "pass a path")).expanduser()


def path_or_name(value: str) -> str:
    """A path or a name (a hub dataset, a preset): not empty, which a path would read as the
    working folder."""
    return _not_blank(value, "pass a path or a name")


def existing_file(value: str) -> Path:
    """A file that exists (a folder or a missing path is refused, each with its own sentence)."""
    path = _path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; pass a file.")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist; check the path.")
    return path


def existing_folder(value: str) -> Path:
    """A folder that exists."""
    path = _path(value)
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is a file; pass a folder.")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} does not exist; check the path.")
    return path


def output_folder(value: str) -> Path:
    """Where a folder will be written: not an existing file, and not inside one."""
    path = _path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file; pass a folder to write into.")
    _check_parents(path, value)
    return path


def output_file(value: str) -> Path:
    """Where a file will be written: not an existing folder, and not inside a file."""
    path = _path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; pass a file name (for example {path / 'out.json'}).")
    _check_parents(path, value)
    return path


def result_file(value: str) -> Path:
    """Where a JSON result is saved (--save): a new file, or a result saved there before, which is
    replaced; any other existing file is refused rather than overwritten."""
    import json

    path = output_file(value)
    if path.exists():
        try:
            replaceable = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
        except (OSError, UnicodeDecodeError, ValueError):
            replaceable = False
        if not replaceable:
            raise argparse.ArgumentTypeError(f"{value} exists and is not a saved JSON result; choose another file.")
    return path


def markdown_file(value: str) -> Path:
    """Where a Markdown file is written (a model card): a .md path, replaced if it exists."""
    path = output_file(value)
    if path.suffix.lower() != ".md":
        raise argparse.ArgumentTypeError(f"{value} is not a .md file; pass a Markdown path such as RUN/README.md.")
    return path


def _check_parents(path: Path, value: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{value} lies inside {parent}, which is a file; pass another path.")
            return


# ------------------------------------------------------------------------------------------------
# Writing an output folder

# A folder holding any of these holds a model, tokenizer, prepared data, a run or a demo: what
# --overwrite may replace. Anything else that is not empty is refused even with --overwrite, so a
# mistyped --out never deletes unrelated files.
OUTPUT_MARKERS = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "vocab.json",
                  "vocab.txt", "tokenizer_config.json", "meta.json", "train.bin", "config.yaml",
                  "metrics.jsonl", "checkpoint.pt", "report.json", "results.json", "summary.json", "demo.json")


class OutputFolder:
    """A folder a command writes, checked before any work starts and written at the end.

        target = OutputFolder(args.out, "--out", overwrite=args.overwrite, inputs=[args.model])
        ...  # the long part
        with target.staged() as folder:
            model.save_pretrained(folder)

    Refused at construction: a file; the working folder, the home folder or one above them; a
    folder that is or holds an input; a folder that already holds a model, tokenizer,
    data or run (unless `overwrite`); any other folder that is not empty.
    """

    def __init__(self, path: str | os.PathLike, flag: str = "--out", overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
        self.path = Path(path).expanduser()
        self.flag = flag
        self.overwrite = overwrite
        where = f"{flag} {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise DistilleryError(f"{where} is a file; pass a folder to write into.")
        resolved = self.path.resolve()
        protected = {Path.cwd().resolve(), Path.home().resolve()}
        if any(resolved == p or resolved in p.parents for p in protected) or resolved == Path(resolved.anchor):
            raise DistilleryError(f"{where} is the working folder, the home folder or one above them; "
                                  "pass a folder of its own.")
        for given in inputs:
            if given is None or not Path(given).expanduser().exists():
                continue  # hub ids and presets are not folders that could be overwritten
            # Inside an input is fine (a corpus folder may hold its prepared data); being or holding
            # one is not: replacing the output would delete the input.
            source = Path(given).expanduser().resolve()
            if source == resolved or resolved in source.parents:
                relation = "is" if source == resolved else "holds"
                raise DistilleryError(f"{where} {relation} the input {given}; write to a folder of its own.")
        entries = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        self.replaces = bool(entries)
        if entries and not any(name in entries for name in OUTPUT_MARKERS):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DistilleryError(f"{where} is not empty ({shown}) and holds no model, tokenizer, data or run; "
                                  "pass a new or empty folder.")
        if entries and not overwrite:
            raise DistilleryError(f"{where} already holds a model, tokenizer, data or run; pass --overwrite to "
                                  "replace it or choose another folder.")

    @contextmanager
    def staged_resumable(self, resume: bool = False, main: bool = True) -> Iterator[Path]:
        """`staged` for a long job that keeps checkpoints: the folder beside the target is
        `overwrite_staging(target)`; a new job (not `resume`) starts it empty, a failure leaves it
        (and says so) for a `resume` to continue, and it replaces the target when the block ends
        normally. The other processes of a multi-process job (`main` False) only get its path."""
        staging = overwrite_staging(self.path)
        if not main:
            yield staging
            return
        if resume and not staging.is_dir():
            raise DistilleryError(f"There is no interrupted --overwrite run to resume in {staging}; drop --resume "
                                  "to start one.")
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed --overwrite run left
        staging.mkdir(parents=True, exist_ok=True)
        try:
            yield staging
        except BaseException:
            if any(staging.iterdir()):
                print(f"note: {self.flag} {self.path} is left as it was; the unfinished run in {staging} continues "
                      "with --overwrite --resume.", file=sys.stderr)
            else:
                staging.rmdir()
            raise
        self._swap_in(staging)

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield an empty folder beside the target; when the block ends normally it replaces the
        target, otherwise it is removed and the target is left as it was."""
        parent = self.path.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.path.name}.partial-"))
        try:
            yield staging
            self._swap_in(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _swap_in(self, staging: Path) -> None:
        target = self.path.absolute()
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give what mkdir would
        if not target.exists():
            os.rename(staging, target)
            return
        if not any(target.iterdir()):
            target.rmdir()
            os.rename(staging, target)
            return
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        old.rmdir()
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def overwrite_staging(path: str | os.PathLike) -> Path:
    """Where a resumable job run with --overwrite is written: `.NAME.overwrite` beside `path`, a fixed
    name, so that --overwrite --resume finds it again after a kill."""
    path = Path(path).expanduser().absolute()
    return path.parent / f".{path.name}.overwrite"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
