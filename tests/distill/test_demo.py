"""`distillery demo`, shrunk to seconds: the whole path from source files to the comparison."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from tiny_run import corpus_files

from distillery.distill.demo import PROMPTS, DemoSettings, format_report, run_demo, stdlib_sources


def test_stdlib_sources_leave_out_tests_and_installed_packages():
    files = stdlib_sources()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert root / "textwrap.py" in files
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "tests", "site-packages"}


def test_scaling_grows_width_and_steps():
    small, big = DemoSettings.scaled(1.0), DemoSettings.scaled(4.0, teacher_steps=7)
    assert big.n_embd == 2 * small.n_embd and big.n_embd % big.n_head == 0
    assert big.student_steps == 4 * small.student_steps and big.teacher_steps == 7


def test_tiny_demo_end_to_end(tmp_path):
    settings = DemoSettings(out=tmp_path / "demo",  # a Path, as the command line gives it
                            vocab_size=300, n_embd=32, n_head=2, teacher_layers=2,
                            seq_len=32, batch_size=8, teacher_steps=30, student_steps=10, lr=3e-3,
                            held_out_modules=1, eval_batches=2, new_tokens=6, plot=False)
    report = run_demo(settings, sources=corpus_files(), progress=False)
    out = Path(settings.out)
    teacher, student = report["models"]["teacher"], report["models"]["student"]
    assert (teacher["layers"], student["layers"]) == (2, 1)
    assert student["parameters"] < teacher["parameters"]
    for row in (teacher, student):
        assert row["perplexity"] < report["chance_perplexity"] / 2
        assert row["decode_tokens_per_s"] > 0
    for name in ("teacher", "student"):
        assert all(report["completions"][name][p].startswith(p) for p in PROMPTS)
        assert (out / name / "model" / "model.safetensors").is_file()
        assert (out / name / "metrics.jsonl").is_file()
    assert json.loads((out / "report.json").read_text())["models"]["student"]["layers"] == 1
    table = format_report(report)
    assert "held-out perplexity" in table and "--- student" in table


@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_demo_refuses_a_non_positive_scale(scale, capsys):
    from distillery.cli import main

    assert main(["demo", "--scale", str(scale)]) == 2
    assert "--scale" in capsys.readouterr().err
