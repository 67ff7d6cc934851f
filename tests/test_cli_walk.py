"""Walk the whole command line with bad values: every case ends with exit 0 or 2, never a traceback.

Every subcommand and every option it declares is discovered from `build_parser()`, so a new
command or option is walked without touching this file (a new command only needs a cheap
baseline in BASELINES, which the first test asks for). Each option in turn gets boundary values
(0, -1, a huge number, nan, inf, an empty string, a missing path, an existing file, an existing
folder) in an otherwise cheap, valid command line, which runs through `main()` in this process
under a time limit. A case passes when it returns 0, or returns 2 having printed an error and no
traceback, and the input files are unchanged. Positionals get the same values.

Run as a script (`python tests/test_cli_walk.py`) to print the counts per command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import save_tiny_gpt2, save_tiny_roberta  # noqa: E402

from distillery import cli, cli_types  # noqa: E402
from distillery.cli import build_parser, main  # noqa: E402

VALUES = ["0", "-1", "99999999999999", "nan", "inf", "", "{missing}", "{file}", "{folder}"]
# The pytest run (`quick`) gives an option that takes any text only these values: the others are
# more of the same text, and text options are what make the walk slow (each case runs the command).
QUICK_TEXT_VALUES = {"", "{missing}", "{file}", "{folder}"}
CASE_SECONDS = 20  # a case still running after this is a hang (the slowest real case takes ~2 s)

# A valid, cheap command line per command: placeholders are fixture paths; {out} is a fresh path
# per case. Long runs are cut to one step on tiny models and data.
TINY_RUN = ["--max-steps", "1", "--batch-size", "2", "--seq-len", "8", "--warmup-steps", "0", "--eval-every", "1",
            "--eval-batches", "1", "--save-every", "1", "--log-every", "1", "--no-plot", "--device", "cpu"]
BASELINES: dict[str, list[str]] = {
    "generate": ["{gpt2}", "def f", "--max-new-tokens", "2"],
    "fill-mask": ["{roberta}", "a <mask> b", "--top-k", "2"],
    "embed": ["{roberta}", "hello"],
    "info": ["{gpt2}"],
    "tokenizer train": ["{text}", "--vocab-size", "300", "--out", "{out}"],
    "prepare": ["{text}", "--tokenizer", "{gpt2}", "--out", "{out}"],
    "student": ["{gpt2}", "--out", "{out}"],
    "teacher-cache": ["{gpt2}", "--data", "{data}", "--out", "{out}", "--top-k", "4", "--seq-len", "8", "--windows", "2"],
    "train": ["--model", "{gpt2}", "--data", "{data}", "--out", "{out}", *TINY_RUN],
    "distill": ["--teacher", "{gpt2}", "--student", "{student}", "--data", "{data}", "--out", "{out}", *TINY_RUN],
    "demo": ["--out", "{out}", "--teacher-steps", "1", "--student-steps", "1"],
    "eval perplexity": ["{gpt2}", "--data", "{text}", "--batch-size", "2"],
    "eval bias": ["{gpt2}", "--data", "{folder}"],
    "eval speed": ["{gpt2}", "{gpt2}", "--batch-size", "1", "--seq-len", "8", "--new-tokens", "2", "--repeats", "1"],
    "eval sts": ["{roberta}", "--data", "{sts}", "--batch-size", "2"],
    "glue": ["sst2", "{roberta}", "--data", "{glue}", "--epochs", "1", "--batch-size", "4", "--max-length", "16"],
    "token-classification": ["{roberta}", "--train", "{conll}", "--dev", "{conll}", "--epochs", "1",
                             "--batch-size", "4", "--max-length", "16"],
    "question-answering": ["{roberta}", "--train", "{squad}", "--dev", "{squad}", "--epochs", "1",
                           "--batch-size", "2", "--max-length", "48", "--doc-stride", "16"],
    "finetune": ["{gpt2}", "--train", "{text}", "--out", "{out}", "--max-steps", "1", "--block-size", "8",
                 "--batch-size", "2"],
    "card": ["{gpt2}", "--out", "{out}/README.md"],
    "bench": ["{gpt2}", "--no-reference", "--new-tokens", "2", "--prompt-tokens", "2", "--repeats", "1",
              "--batch", "1", "--forward-shape", "1x8"],
    "serve": ["{gpt2}", "--port", "0"],
}
# What would run for minutes (or forever, a server) is replaced after its arguments are checked:
# the walk is about the command line, and these functions have tests of their own.
STUBS = {
    "demo": ("distillery.distill.demo", "run_demo", lambda *a, **k: {}),
    "demo report": ("distillery.distill.demo", "format_report", lambda report: "(stubbed demo)"),
    "bench": ("distillery.generation.bench", "measure_bandwidth", lambda *a, **k: 10.0),
    "serve": ("distillery.serve.commands", "run_server", lambda *a, **k: _load_and_return(*a, **k)),
}


def _load_and_return(app, sock, load_models, access_log=False) -> None:
    """`serve` without serving: the models load (their errors reported as the server reports them),
    then the command returns instead of listening until Ctrl-C."""
    from distillery.models.common import DistilleryError

    try:
        load_models()
    except DistilleryError as e:
        raise DistilleryError(f"A model did not load: {e}") from e


@dataclass
class Case:
    command: str
    option: str  # the option (or positional's metavar) given a bad value
    value: str
    argv: list[str]
    quick: bool = True  # part of the pytest run


@dataclass
class Outcome:
    kind: str  # "exit 0", "exit 2", or what went wrong: "traceback", "hang", "exit N", "changed input", ...
    detail: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Discovery


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every runnable subcommand, nested ones as "eval perplexity"."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))
            return
    yield " ".join(prefix), parser


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every action that takes a value (flags and --help left out)."""
    for action in parser._actions:
        if action.nargs == 0 or isinstance(action, argparse._HelpAction):
            continue
        yield action


def cases(paths: dict[str, str]) -> Iterator[Case]:
    for command, parser in commands(build_parser()):
        baseline = BASELINES.get(command)
        if baseline is None:
            continue
        positionals = [a for a in options(parser) if not a.option_strings]
        for action in options(parser):
            for value in VALUES:
                argv = list(baseline)
                if action.option_strings:
                    flag = next((s for s in action.option_strings if s in argv), None)
                    if flag is not None:
                        argv[argv.index(flag) + 1] = value
                    else:
                        argv += [action.option_strings[-1], value]
                    name = action.option_strings[-1]
                else:
                    slots = [i for i, a in enumerate(argv) if not a.startswith("-")
                             and (i == 0 or not argv[i - 1].startswith("-") or argv[i - 1] in _flags(parser))]
                    argv[slots[positionals.index(action)]] = value
                    name = action.metavar or action.dest
                takes_text = action.type in (None, str, cli_types.text, cli_types.path_or_name) and not action.choices
                yield Case(command, name, value, [*command.split(), *argv],
                           quick=not takes_text or value in QUICK_TEXT_VALUES)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.nargs == 0 for s in a.option_strings}


# ------------------------------------------------------------------------------------------------
# Fixtures


def build_fixtures(root: Path) -> dict[str, str]:
    """Tiny models, data and task files under `root`; the placeholders of BASELINES."""
    import json

    from distillery.tokenizer import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nThe cat sat on the mat. A dog ran.\n" * 40, encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["tokenizer", "train", str(text), "--vocab-size", "300", "--out", str(root / "tok")]) == 0
        assert main(["tokenizer", "train", str(text), "--vocab-size", "300", "--style", "roberta",
                     "--out", str(root / "rtok")]) == 0
        # Each model as large as its tokenizer: every id it can emit decodes.
        gpt2 = save_tiny_gpt2(root / "gpt2", vocab_size=load_tokenizer(root / "tok").vocab_size, bos_token_id=0,
                              eos_token_id=0)
        roberta = save_tiny_roberta(root / "roberta", vocab_size=load_tokenizer(root / "rtok").vocab_size)
        for model, tokenizer in ((gpt2, "tok"), (roberta, "rtok")):
            for file in (root / tokenizer).iterdir():
                (model / file.name).write_bytes(file.read_bytes())
        corpus = root / "corpus"
        corpus.mkdir()
        for i in range(3):
            (corpus / f"{i}.txt").write_text(text.read_text(encoding="utf-8"), encoding="utf-8")
        assert main(["prepare", str(corpus), "--tokenizer", str(gpt2), "--out", str(root / "data"),
                     "--val-docs", "1"]) == 0
        assert main(["student", str(gpt2), "--out", str(root / "student")]) == 0
    (root / "glue").mkdir()
    rows = "".join(f"{w}\t{i % 2}\n" for i, w in enumerate(["good film", "bad film", "fine", "awful"] * 2))
    for split in ("train.tsv", "dev.tsv"):
        (root / "glue" / split).write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    (root / "conll.txt").write_text("EU B-ORG\nrejects O\nPeter B-PER\n\nThe O\ncat O\n\n", encoding="utf-8")
    context = "The cat sat on the mat in France."
    squad = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": context.index("France")}]}]}]}]}
    (root / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
    (root / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "a cat\ta dog\t3.0\nthe mat\ta hat\t1.0\n" * 3,
                                  encoding="utf-8")
    (root / "a-file.txt").write_text("just a file\n", encoding="utf-8")
    (root / "a-folder").mkdir()
    return {"gpt2": str(gpt2), "roberta": str(roberta), "text": str(text), "data": str(root / "data"),
            "student": str(root / "student"), "glue": str(root / "glue"), "conll": str(root / "conll.txt"),
            "squad": str(root / "squad.json"), "sts": str(root / "sts.tsv"), "file": str(root / "a-file.txt"),
            "folder": str(root / "a-folder"), "missing": str(root / "no-such-path")}


# ------------------------------------------------------------------------------------------------
# Running one case


class Hang(BaseException):
    """Raised by the alarm in a case that runs past CASE_SECONDS (BaseException: not caught as an error)."""


def snapshot(root: Path, scratch: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every input file's size and time; the scratch paths (a missing path, an empty folder),
    which a case may rightly write into as its output, are left out."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not any(s == p or s in p.parents for s in scratch)}


def reset_scratch(scratch: tuple[Path, ...]) -> None:
    """The missing path missing again and the empty folder empty again, for the next case."""
    missing, folder = scratch
    if missing.is_dir():
        shutil.rmtree(missing)
    elif missing.exists():
        missing.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()


def run_case(case: Case, paths: dict[str, str], out: Path, inputs: Path,
             before: dict[str, tuple[int, int]]) -> Outcome:
    """One case through main(); `before` is the inputs' snapshot, which it must leave as it was."""
    argv = [a.format(**paths, out=out) for a in case.argv]
    scratch = (Path(paths["missing"]), Path(paths["folder"]))
    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    except Hang:
        return Outcome("hang", " ".join(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - any escape is what this walk looks for
        return Outcome("traceback", f"{type(e).__name__}: {e}"[:300])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)
    changed = snapshot(inputs, scratch) != before
    reset_scratch(scratch)
    if changed:
        return Outcome("changed input", " ".join(argv))
    err = stderr.getvalue()
    if code == 0:
        return Outcome("exit 0")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if code == 2 and "Traceback" not in err and ": error: " in last:
        return Outcome("exit 2", last)
    return Outcome(f"exit {code}", err[-300:])


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    import importlib

    saved = []
    for module_name, attr, replacement in STUBS.values():
        module = importlib.import_module(module_name)
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)



def walk(root: Path, only: set[str] | None = None, quick: bool = False) -> list[tuple[Case, Outcome]]:
    """Every case (only those of the commands in `only`; only the quick ones with `quick`), run in
    a working folder of its own that is emptied after each case, so that a relative path such as
    "0" written by one case is not read by the next."""
    paths = build_fixtures(root / "inputs")
    workdir = root / "cwd"
    workdir.mkdir()
    parser = build_parser()  # built once: building it is most of a rejected case's time
    inputs = root / "inputs"
    before = snapshot(inputs, (Path(paths["missing"]), Path(paths["folder"])))
    results = []
    previous_dir = os.getcwd()
    os.chdir(workdir)
    try:
        with stubbed(), _replaced(cli, "build_parser", lambda: parser):
            for i, case in enumerate(cases(paths)):
                if (only and case.command not in only) or (quick and not case.quick):
                    continue
                out = root / "outputs" / f"case-{i}"
                started = time.perf_counter()
                outcome = run_case(case, paths, out / "out", inputs, before)
                if outcome.kind == "changed input":  # report it once, not again for every later case
                    before = snapshot(inputs, (Path(paths["missing"]), Path(paths["folder"])))
                outcome.seconds = time.perf_counter() - started
                results.append((case, outcome))
                for entry in workdir.iterdir():
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    finally:
        os.chdir(previous_dir)
    return results


@contextlib.contextmanager
def _replaced(owner, name: str, value) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# ------------------------------------------------------------------------------------------------
# Tests


def test_every_command_has_a_baseline():
    missing = [name for name, _ in commands(build_parser()) if name not in BASELINES]
    assert not missing, f"add a cheap valid command line for {missing} to BASELINES in {__file__}"


def test_every_option_has_help():
    bare = [f"{name} {a.option_strings[-1] if a.option_strings else a.metavar or a.dest}"
            for name, parser in commands(build_parser()) for a in parser._actions if not (a.help or "").strip()]
    assert not bare, f"options without help text: {bare}"


def test_help_shows_defaults():
    for name, parser in commands(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
                assert "default" in (action.help or "") or f"(default: {action.default})" in " ".join(text.split()), \
                    f"{name} {action.option_strings[-1]} does not show its default"


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> list[tuple[Case, Outcome]]:
    os.environ.setdefault("TQDM_DISABLE", "1")
    return walk(tmp_path_factory.mktemp("walk"), quick=True)


def test_walk_ends_in_exit_0_or_2(walked):
    bad = [(c, o) for c, o in walked if o.kind not in ("exit 0", "exit 2")]
    report = "\n".join(f"{c.command} {c.option}={c.value!r}: {o.kind} {o.detail}" for c, o in bad[:40])
    assert not bad, f"{len(bad)} of {len(walked)} cases ended otherwise:\n{report}"


def test_errors_name_only_options_the_command_has(walked):
    """A message advising --max-length on a command without one sends the user nowhere."""
    import re

    parsers = dict(commands(build_parser()))
    wrong = []
    for case, outcome in walked:
        if outcome.kind == "exit 2":
            known = {s for a in parsers[case.command]._actions for s in a.option_strings}
            message = outcome.detail.split(": error: ", 1)[-1]
            # A quoted command line of another command (`distillery prepare ... --tokenizer TOK`) names
            # that command's options, which is where it sends the user.
            own = re.sub(r"`distillery (?!" + re.escape(case.command) + r"\b)[^`]*`", "", message)
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", own))
            wrong += [f"{case.command}: {flag} in {outcome.detail!r}" for flag in named - known]
    assert not wrong, "\n".join(sorted(set(wrong))[:30])


def test_walk_covers_every_command(walked):
    assert {c.command for c, _ in walked} == set(BASELINES) & {n for n, _ in commands(build_parser())}
    assert len(walked) >= 300


# ------------------------------------------------------------------------------------------------
# Reported bad inputs the walk's values do not reach: file contents, broken checkpoints, defaults
# that must fit a 128-position model. Each ends in one sentence with exit 2, or runs and says what
# it changed.


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> dict[str, str]:
    import json

    from safetensors.torch import load_file, save_file

    from distillery.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("reported")
    paths = build_fixtures(root)
    gpt2, roberta = Path(paths["gpt2"]), Path(paths["roberta"])

    def variant(source: Path, name: str) -> Path:
        shutil.copytree(source, root / name)
        return root / name

    for source, name in ((gpt2, "gpt2-nan"), (roberta, "roberta-nan")):
        weights = load_file(variant(source, name) / "model.safetensors")
        save_file({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
                  root / name / "model.safetensors", metadata={"format": "pt"})
    (variant(gpt2, "gpt2-genlist") / "generation_config.json").write_text("[]")
    (variant(gpt2, "gpt2-genbad") / "generation_config.json").write_text('{"do_sample": true, "temperature": "hot"}')
    config = json.loads((variant(gpt2, "gpt2-cfgtype") / "config.json").read_text())
    (root / "gpt2-cfgtype" / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": "1e-5"}))
    long = save_tiny_gpt2(root / "gpt2-128", vocab_size=load_tokenizer(gpt2).vocab_size, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    for file in gpt2.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(file, long / file.name)
    classifier = save_tiny_roberta(root / "classifier", "RobertaForSequenceClassification",
                                   vocab_size=load_tokenizer(roberta).vocab_size, num_labels=2)
    for file in roberta.iterdir():
        if file.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(file, classifier / file.name)
    (root / "blank.txt").write_text("   \n\n  \t\n")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    context = "The cat sat on the mat in France."
    for name, answer in (("past", {"text": "France", "answer_start": 500}), ("absent", {"text": "Spain", "answer_start": 3})):
        (root / f"squad-{name}.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [
            {"context": context, "qas": [{"id": "q1", "question": "Where?", "answers": [answer]}]}]}]}))
    return {**paths, **{p.name.replace("-", "_").split(".")[0]: str(p) for p in root.iterdir()}}


REPORTED = [  # argv, exit code, words in the last line of stderr
    (["eval", "perplexity", "{gpt2}", "--data", "{blank}"], 2, "blank.txt is 6 tokens long, shorter than one window"),
    (["finetune", "{gpt2}", "--train", "{blank}", "--out", "{out}", "--block-size", "8"], 2, "less than one block"),
    (["token-classification", "{roberta}", "--train", "{binary}", "--dev", "{conll}"], 2, "is not UTF-8 text"),
    (["generate", "{gpt2}", "a\udcffb"], 2, "argument PROMPT: holds bytes that are not UTF-8 text"),
    (["generate", "{gpt2_genlist}", "def f"], 2, "generation_config.json must hold a JSON object of settings"),
    (["generate", "{gpt2_genbad}", "def f"], 2, "generation_config.json: temperature must be a finite number"),
    (["info", "{gpt2_cfgtype}"], 2, "config.json: GPT2Config.layer_norm_epsilon must be a finite number"),
    (["generate", "{gpt2_cfgtype}", "def f"], 2, "config.json: GPT2Config.layer_norm_epsilon must be a finite number"),
    (["question-answering", "{roberta}", "--train", "{squad_past}", "--dev", "{squad}"], 2, "is not in its context"),
    (["question-answering", "{roberta}", "--train", "{squad_absent}", "--dev", "{squad}"], 2, "is not in its context"),
    (["fill-mask", "{classifier}", "a <mask> b"], 2, "without a masked-LM head"),
    (["generate", "{gpt2_nan}", "def f"], 2, "holds NaN or infinite values"),
    (["eval", "perplexity", "{gpt2_nan}", "--data", "{text}", "--json"], 2, "holds NaN or infinite values"),
    (["fill-mask", "{roberta_nan}", "a <mask> b"], 2, "holds NaN or infinite values"),
    (["embed", "{roberta_nan}", "hello", "--json"], 2, "holds NaN or infinite values"),
    (["eval", "perplexity", "{gpt2}", "--data", "{folder}"], 2, "is a folder; pass a file"),
    (["fill-mask", "{roberta}", "a <mask> b" + " word" * 70], 2, "(--truncation on the command line)"),
    # Defaults lowered to a 128-position model, said once on stderr.
    (["generate", "{gpt2_128}", "def f", "--greedy"], 0, "note: generating at most 126 new tokens"),
    (["bench", "{gpt2_128}", "--no-reference", "--new-tokens", "2", "--prompt-tokens", "2", "--repeats", "1",
      "--batch", "1"], 0, "measuring a 8x128 forward"),
    (["eval", "speed", "{gpt2_128}", "{gpt2_128}", "--batch-size", "1", "--seq-len", "8", "--new-tokens", "1000",
      "--repeats", "1"], 0, "decodes 112 new tokens"),
]


@pytest.mark.parametrize("argv, code, words", REPORTED, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _, _) in
                                                             enumerate(REPORTED)])
def test_reported_bad_inputs(reported, tmp_path, capsys, argv, code, words):
    assert main([a.format(**reported, out=tmp_path / "out") for a in argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "note:" in line or ": error: " in line]
    assert lines and words in (lines[0] if code == 0 else lines[-1]), err[-500:]


def test_a_yaml_number_in_exponent_form_is_a_number(tmp_path):
    """YAML 1.1 reads `lr: 1e-3` as text; the run reads it as the number it means."""
    from distillery.distill.run_config import RunConfig

    (tmp_path / "run.yaml").write_text("lr: 1e-3\nmax_steps: 10\n")
    assert RunConfig.from_yaml(tmp_path / "run.yaml").lr == 1e-3


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        results = walk(Path(tmp), {a for a in sys.argv[1:] if a != "--quick"} or None, quick=quick)
    by_command: dict[str, Counter] = {}
    for case, outcome in results:
        by_command.setdefault(case.command, Counter())[outcome.kind] += 1
    for command, counts in by_command.items():
        print(f"{command:<22} {dict(counts)}")
    total = Counter(o.kind for _, o in results)
    print(f"total {len(results)} cases in {time.perf_counter() - start:.0f} s: {dict(total)}")
    for case, outcome in results:
        if outcome.kind not in ("exit 0", "exit 2"):
            print(f"  {case.command} {case.option}={case.value!r}: {outcome.kind} {outcome.detail}")
    if os.environ.get("WALK_LOG"):  # every case, one JSON line each
        import json

        with open(os.environ["WALK_LOG"], "w", encoding="utf-8") as f:
            for case, outcome in results:
                f.write(json.dumps({"command": case.command, "option": case.option, "value": case.value,
                                    "kind": outcome.kind, "detail": outcome.detail,
                                    "seconds": round(outcome.seconds, 3)}) + "\n")
