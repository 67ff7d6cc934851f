"""`train`, `distill` and `demo` over an existing run: refused without --overwrite; with it, the new
run is written in `.NAME.overwrite` beside the old one and replaces it only when it finishes, so a
failure or Ctrl-C leaves the old run byte for byte, and --overwrite --resume continues the new one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tiny_run import corpus_files, make_teacher_student

from distillery.cli import main
from distillery.distill import demo
from distillery.distill.data import TokenDataset
from distillery.distill.demo import DemoSettings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_teacher_student(tmp_path_factory.mktemp("overwrite"))


def argv(command: str, setup, out: Path, steps: int, *extra) -> list[str]:
    models = {"train": ["--model", setup["teacher"]],
              "distill": ["--teacher", setup["teacher"], "--student", setup["student"]]}[command]
    args = [command, *models, "--data", setup["data"], "--out", out, "--max-steps", steps, "--batch-size", 2,
            "--seq-len", 16, "--warmup-steps", 1, "--eval-every", 2, "--save-every", 2, "--eval-batches", 1,
            "--device", "cpu", "--no-plot", *extra]
    return [str(a) for a in args]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_step(folder: Path) -> int:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["step"]


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def fail_at_batch(monkeypatch, n: int, error: type[BaseException]) -> list[int]:
    """Make the n-th training batch from now raise `error`; the returned list counts the batches."""
    real, calls = TokenDataset.batch, []

    def batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TokenDataset, "batch", batch)
    return calls


@pytest.mark.parametrize("command", ["train", "distill"])
def test_an_existing_run_is_refused_and_inputs_are_never_outputs(command, setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv(command, setup, out, 2)) == 0
    before = snapshot(out)
    assert main(argv(command, setup, out, 4)) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in last_line(capsys)
    assert snapshot(out) == before
    for given in (setup["teacher"], setup["data"]) + ((setup["student"],) if command == "distill" else ()):
        inputs = snapshot(given)
        for extra in ([], ["--overwrite"]):
            assert main(argv(command, setup, given, 2, *extra)) == 2
            assert f"is the input {given}" in last_line(capsys)
        assert snapshot(given) == inputs


@pytest.mark.parametrize("command, failure", [("train", KeyboardInterrupt), ("distill", RuntimeError)])
def test_an_interrupted_overwrite_keeps_the_old_run_and_resumes(command, failure, setup, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "run"
    assert main(argv(command, setup, out, 2)) == 0
    before = snapshot(out)
    capsys.readouterr()

    fail_at_batch(monkeypatch, 3, failure)  # step 3 of 4, after the checkpoint of step 2
    if failure is KeyboardInterrupt:
        assert main(argv(command, setup, out, 4, "--overwrite")) == 130
    else:
        with pytest.raises(RuntimeError, match="injected failure"):
            main(argv(command, setup, out, 4, "--overwrite"))
    staging = tmp_path / ".run.overwrite"
    assert snapshot(out) == before and checkpoint_step(staging) == 2
    assert f"the unfinished run in {staging} continues with --overwrite --resume" in capsys.readouterr().err

    calls = fail_at_batch(monkeypatch, 0, failure)  # counts only
    code = main(argv(command, setup, out, 4, "--overwrite", "--resume", "--json"))
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and len(calls) == 2  # steps 3 and 4 only: continued from the staged checkpoint
    assert summary["model"] == str(out / "model") and summary["steps"] == 4
    assert checkpoint_step(out) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert main(argv(command, setup, out, 4, "--overwrite", "--resume")) == 2  # nothing left to resume
    assert "no interrupted --overwrite run to resume" in last_line(capsys)


@pytest.mark.parametrize("command", ["train", "distill"])
def test_a_finished_overwrite_replaces_the_run_and_plain_resume_continues_in_place(command, setup, tmp_path,
                                                                                    capsys, monkeypatch):
    out = tmp_path / "run"
    fail_at_batch(monkeypatch, 3, KeyboardInterrupt)
    assert main(argv(command, setup, out, 4)) == 130
    assert checkpoint_step(out) == 2
    monkeypatch.undo()
    assert main(argv(command, setup, out, 4, "--resume")) == 0  # in place, as before --overwrite existed
    assert checkpoint_step(out) == 4
    assert main(argv(command, setup, out, 2, "--overwrite")) == 0
    assert checkpoint_step(out) == 2 and json.loads((out / "summary.json").read_text())["run"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------------------------------
# The demo: its folder as a whole


@pytest.fixture
def tiny_demo(monkeypatch):
    def scaled(scale=1.0, out="runs/demo", seed=0, teacher_steps=None, student_steps=None) -> DemoSettings:
        return DemoSettings(out=out, seed=seed, vocab_size=300, n_embd=32, n_head=2, teacher_layers=2, seq_len=32,
                            batch_size=8, teacher_steps=teacher_steps or 8, student_steps=student_steps or 4,
                            lr=3e-3, held_out_modules=1, eval_batches=2, new_tokens=6, plot=False)

    monkeypatch.setattr(DemoSettings, "scaled", staticmethod(scaled))
    monkeypatch.setattr(demo, "stdlib_sources", corpus_files)


def demo_argv(out: Path, *extra) -> list[str]:
    return [str(a) for a in ("demo", "--out", out, "--json", *extra)]


def test_demo_over_an_existing_demo(tiny_demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(demo_argv(out, "--teacher-steps", 4)) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(demo_argv(out)) == 2
    assert "already holds a demo; pass --resume to continue it, --overwrite to replace it" in last_line(capsys)
    assert snapshot(out) == before

    # Interrupted in the distillation (teacher: 8 batches; student: a checkpoint every step).
    fail_at_batch(monkeypatch, 8 + 3, KeyboardInterrupt)
    assert main(demo_argv(out, "--overwrite")) == 130
    staging = tmp_path / ".demo.overwrite"
    assert snapshot(out) == before and checkpoint_step(staging / "student") == 2
    assert "continues with --overwrite --resume" in capsys.readouterr().err

    calls = fail_at_batch(monkeypatch, 0, KeyboardInterrupt)  # counts only
    assert main(demo_argv(out, "--overwrite", "--resume")) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(calls) == 2  # the teacher was done; the student's steps 3 and 4
    assert report["models"]["student"]["model"] == str(out / "student" / "model")
    assert checkpoint_step(out / "teacher") == 8 and checkpoint_step(out / "student") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    assert main(demo_argv(out, "--overwrite")) == 0  # what `make demo` does when run again
    assert json.loads((out / "report.json").read_text())["settings"]["teacher_steps"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    # A finished demo, swapped in, resumes in place: its finished runs are kept, not run again.
    calls = fail_at_batch(monkeypatch, 0, KeyboardInterrupt)  # counts only
    capsys.readouterr()
    assert main(demo_argv(out, "--resume")) == 0
    assert len(calls) == 0 and json.loads(capsys.readouterr().out)["models"]["student"]["perplexity"] > 1


def test_an_interrupted_demo_resumes_in_place_with_its_own_settings(tiny_demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    fail_at_batch(monkeypatch, 8 + 3, KeyboardInterrupt)
    assert main(demo_argv(out)) == 130
    assert checkpoint_step(out / "student") == 2
    assert main(demo_argv(out, "--resume", "--student-steps", 6)) == 2
    assert "was started with other settings (student_steps)" in last_line(capsys)
    assert main(demo_argv(out, "--overwrite", "--resume")) == 2
    assert "no interrupted --overwrite run to resume" in last_line(capsys)
    calls = fail_at_batch(monkeypatch, 0, KeyboardInterrupt)  # counts only
    assert main(demo_argv(out, "--resume")) == 0
    assert len(calls) == 2 and checkpoint_step(out / "student") == 4 and (out / "report.json").is_file()
