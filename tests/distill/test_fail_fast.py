"""Runs fail before the first step when they would fail at all, and lose nothing when they fail after.

Each check a run could fail at the end (a validation split without a window, a sequence length past
the model's positions, a run folder that cannot be written, matplotlib missing for the plot) is
made before step 1; an error in the final evaluation loses nothing (the final model is written
before it); a validation loss that is not finite stops the run before a checkpoint of those weights;
an interrupt keeps the last checkpoint.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml
from tiny_run import corpus_files, make_gpt2, make_student

from distillery.cli import main
from distillery.distill import trainer
from distillery.distill.data import prepare_corpus
from distillery.distill.run_config import RunConfig
from distillery.distill.trainer import run
from distillery.models.common import DistilleryError
from distillery.tokenizer import load_tokenizer, train_tokenizer

TINY = dict(max_steps=4, batch_size=2, seq_len=16, warmup_steps=1, eval_every=100, save_every=2, log_every=1,
            eval_batches=1, plot=False, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One stdlib module as a corpus of a single document, a tiny GPT-2 teacher (64 positions) and its student."""
    root = tmp_path_factory.mktemp("fail-fast")
    files = corpus_files()
    train_tokenizer(files, 300, "gpt2", root / "tokenizer", show_progress=False)
    tokenizer = load_tokenizer(root / "tokenizer")
    meta = prepare_corpus([files[-3]], tokenizer, root / "one-doc", progress=False)
    # A corpus whose held-out document is short: 6 tokens of validation.
    (root / "short").mkdir()
    (root / "short" / "a.txt").write_text("x = 1\n")
    (root / "short" / "b.py").write_text(files[0].read_text())
    for seed in range(20):  # the seed whose held-out document is the short one
        short = prepare_corpus([root / "short"], tokenizer, root / "short-data", val_docs=1, seed=seed,
                               progress=False, overwrite=True)
        if short["counts"]["val_tokens"] < 17:
            break
    assert short["counts"]["val_tokens"] < 17
    teacher = make_gpt2(root / "teacher", root / "tokenizer", dropout=0.0, n_layer=2)
    return {"root": root, "meta": meta, "data": root / "one-doc", "short": root / "short-data",
            "teacher": teacher, "student": make_student(teacher, root / "student")}


def config(setup, out, **overrides) -> RunConfig:
    settings = {**TINY, "data": str(setup["data"]), **overrides}
    return RunConfig(kind="distill", teacher=str(setup["teacher"]), student=str(setup["student"]), out=str(out),
                     **settings)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_one_document_corpus_distils_and_evaluates_on_its_tail(setup, tmp_path):
    assert setup["meta"]["val_split"] == "tail" and setup["meta"]["counts"]["val_tokens"] > 17
    summary = run(config(setup, tmp_path / "run"), progress=False)
    assert summary["steps"] == 4 and summary["val_ppl"] > 1
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert [r["step"] for r in records(tmp_path / "run") if "val_loss" in r] == [4]


def test_validation_split_too_small_is_one_sentence_before_step_one(setup, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(DistilleryError, match="val split.*fewer than one window of 17.*--val-fraction.*--seq-len"):
        run(config(setup, out, data=str(setup["short"])), progress=False)
    assert not out.exists()
    code = main(["distill", "--teacher", str(setup["teacher"]), "--student", str(setup["student"]), "--data",
                 str(setup["short"]), "--out", str(out), "--seq-len", "16", "--device", "cpu", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--val-docs" in err and not out.exists()


def test_default_seq_len_is_lowered_to_the_model_and_said(setup, tmp_path, capsys):
    default = RunConfig().seq_len  # what a run gets when neither flags nor YAML set it
    summary = run(config(setup, tmp_path / "run", seq_len=default, max_steps=1), progress=False)
    assert summary["seq_len"] == 64  # the tiny teacher's n_positions, not the default 256
    assert "lowered from its default 256 to the model's 64 positions" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seq_len"] == 64
    # A length the user asked for is not lowered.
    with pytest.raises(DistilleryError, match="--seq-len 100 exceeds the model's 64 positions"):
        run(config(setup, tmp_path / "long", seq_len=100), progress=False)
    assert not (tmp_path / "long").exists()


def test_run_folder_that_cannot_be_written(setup, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(DistilleryError, match="lies under the file"):
        run(config(setup, tmp_path / "file" / "run"), progress=False)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trainer.tempfile, "TemporaryFile", refuse)
    with pytest.raises(DistilleryError, match="cannot be written \\(Permission denied"):
        run(config(setup, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_missing_matplotlib_is_one_line_and_no_plot(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a plain install of the package
    summary = run(config(setup, tmp_path / "run", plot=True, max_steps=2), progress=False)
    err = capsys.readouterr().err
    assert summary["steps"] == 2 and (tmp_path / "run" / "model").is_dir()
    assert "matplotlib is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "loss.png").exists()


def test_error_in_the_final_evaluation_loses_nothing(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    evaluate = trainer.evaluate_loss

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(trainer, "evaluate_loss", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run(config(setup, out), progress=False)
    assert "checkpoint.pt keeps the last checkpoint; rerun with --resume" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert (out / "model" / "model.safetensors").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 4 and "train_loss" in saved and "val_loss" not in saved

    monkeypatch.setattr(trainer, "evaluate_loss", evaluate)
    summary = run(config(setup, out), resume=True, progress=False)  # only the evaluation is left to do
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    assert [r["step"] for r in records(out) if "val_loss" in r] == [4]
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]


@pytest.mark.parametrize("bad_step", [2, 4])
def test_nonfinite_validation_loss_stops_the_run(setup, tmp_path, monkeypatch, capsys, bad_step):
    # Evaluations at steps 2 and 4; a checkpoint after step 2's, and the final model before step 4's.
    out = tmp_path / "run"
    evaluate = trainer.evaluate_loss

    def nan_at_bad_step(*args, **kwargs):
        nan_at_bad_step.calls += 1
        return float("nan") if 2 * nan_at_bad_step.calls == bad_step else evaluate(*args, **kwargs)

    nan_at_bad_step.calls = 0
    monkeypatch.setattr(trainer, "evaluate_loss", nan_at_bad_step)
    code = main(["distill", "--teacher", str(setup["teacher"]), "--student", str(setup["student"]), "--data",
                 str(setup["data"]), "--out", str(out), "--max-steps", "4", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "2", "--save-every", "2", "--eval-batches", "1", "--device", "cpu", "--no-plot"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("distillery distill: error: The validation loss became nan at step "
                                         f"{bad_step} (")
    assert "); lower --lr (now" in last
    if bad_step == 2:  # stopped before a checkpoint of those weights
        assert "nothing was saved yet" in last
        assert not (out / "checkpoint.pt").exists() and not (out / "model").exists()
    else:  # the finished steps are kept: their weights are finite
        assert f"the weights of that step, all finite, are in {out / 'model'}" in last
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
        assert "val_loss" not in json.loads((out / "summary.json").read_text())


def test_nonfinite_final_validation_of_an_overwrite_run_names_its_staging_folder(setup, tmp_path, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "run"
    argv = ["distill", "--teacher", str(setup["teacher"]), "--student", str(setup["student"]), "--data",
            str(setup["data"]), "--out", str(out), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--device", "cpu", "--no-plot"]
    assert main(argv + ["--max-steps", "2"]) == 0
    monkeypatch.setattr(trainer, "evaluate_loss", lambda *a, **k: float("nan"))  # only the final one runs
    assert main(argv + ["--max-steps", "4", "--eval-every", "10", "--overwrite"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    staged = tmp_path / ".run.overwrite"
    assert f"are in {staged / 'model'}" in last and "--overwrite --resume or start again" in last
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # the old run is untouched


def test_interrupt_mid_run_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate_loss", interrupt)  # at step 3, between checkpoints 2 and 4
    code = main(["distill", "--teacher", str(setup["teacher"]), "--student", str(setup["student"]), "--data",
                 str(setup["data"]), "--out", str(out), "--max-steps", "4", "--batch-size", "2", "--seq-len", "16",
                 "--eval-every", "3", "--save-every", "2", "--eval-batches", "1", "--device", "cpu", "--no-plot"])
    assert code == 130 and "keeps the last checkpoint" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
