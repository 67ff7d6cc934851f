"""Checkpoints: --resume continues bit for bit, and neither a kill nor a full disk corrupts them."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import make_data, make_gpt2, make_student

from distillery.distill import trainer
from distillery.distill.data import TokenDataset
from distillery.distill.run_config import RunConfig
from distillery.distill.trainer import check_resumable, check_same_layout, load_checkpoint, run
from distillery.models.common import DistilleryError

# Six steps, a checkpoint every two; the models keep dropout on, so the restored random states matter.
SETTINGS = dict(max_steps=6, batch_size=4, seq_len=16, warmup_steps=2, eval_every=2, save_every=2, log_every=1,
                eval_batches=2, plot=False)
TIMING = ("tokens_per_s", "elapsed_s")

# Runs the CLI with torch.save replaced by one that writes half of the second checkpoint and then
# SIGKILLs its own process: a kill in the middle of a checkpoint write.
KILLED_DURING_SECOND_CHECKPOINT = """
import os, signal, sys, torch
real_save, calls = torch.save, []
def save_then_die(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"half a checkpoint"); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
from distillery.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_data(root)
    teacher = make_gpt2(root / "teacher", root / "tokenizer", n_layer=2)
    student = make_student(teacher, root / "student")
    config = RunConfig(kind="distill", teacher=str(teacher), student=str(student), data=str(data),
                       out=str(root / "uninterrupted"), **SETTINGS)
    run(config, progress=False)
    return {"root": root, "config": config, "uninterrupted": root / "uninterrupted"}


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_run(out: Path, reference: Path) -> None:
    assert records(out) == records(reference)  # every loss, learning rate and perplexity, exactly
    ours, theirs = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert ours["step"] == theirs["step"] == SETTINGS["max_steps"]
    for name, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][name], tensor), name


def test_resume_after_a_crash_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    config = setup["config"].replace(out=str(tmp_path / "run"))
    real_batch, calls = TokenDataset.batch, []

    def crash_at_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(TokenDataset, "batch", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4
    monkeypatch.setattr(TokenDataset, "batch", real_batch)
    run(config, resume=True, progress=False)
    assert_same_run(tmp_path / "run", setup["uninterrupted"])


def test_a_kill_during_a_checkpoint_write_loses_only_that_checkpoint(setup, tmp_path):
    config, out = setup["config"], tmp_path / "run"
    flags = ["distill", "--teacher", config.teacher, "--student", config.student, "--data", config.data,
             "--out", str(out), "--no-plot"]
    for name in ("max_steps", "batch_size", "seq_len", "warmup_steps", "eval_every", "save_every", "log_every",
                 "eval_batches"):
        flags += ["--" + name.replace("_", "-"), str(SETTINGS[name])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SECOND_CHECKPOINT, *flags], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the half-written file of the killed process
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # the previous one, whole

    from distillery.cli import main

    assert main(["distill", "--out", str(out), "--resume"]) == 0  # settings from the run's config.yaml
    assert not list(out.glob(".checkpoint.pt.*.tmp"))
    assert_same_run(out, setup["uninterrupted"])


def test_a_full_disk_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    config = setup["config"].replace(out=str(tmp_path / "run"))
    real_save, calls = torch.save, []

    def disk_full_on_second_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainer.torch, "save", disk_full_on_second_save)
    with pytest.raises(DistilleryError, match="disk space"):
        run(config, progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert not list((tmp_path / "run").glob(".checkpoint.pt.*.tmp"))


def test_resume_refuses_other_settings_and_another_tokenizer(setup):
    checkpoint_path = setup["uninterrupted"] / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path)
    with pytest.raises(DistilleryError, match="lr: 0.0005 -> 0.001"):
        check_resumable(checkpoint, setup["config"].replace(lr=1e-3), checkpoint["tokenizer"], checkpoint_path)
    with pytest.raises(DistilleryError, match="another tokenizer"):
        check_resumable(checkpoint, setup["config"], "0" * 64, checkpoint_path)
    # Settings that do not change what is trained may differ: a longer run, other logging.
    check_resumable(checkpoint, setup["config"].replace(max_steps=10, log_every=5), checkpoint["tokenizer"],
                    checkpoint_path)


def test_resume_refuses_weights_laid_out_otherwise(setup):
    """As in a RoBERTa checkpoint from before query, key and value became one layer."""
    checkpoint_path = setup["uninterrupted"] / "checkpoint.pt"
    weights = load_checkpoint(checkpoint_path)["model"]
    model = torch.nn.Module()
    model.register_buffer("qkv", torch.zeros(1))
    with pytest.raises(DistilleryError, match=r"laid out for another model or distillery version .* lacks "
                                              r"\['qkv'\], has \['blocks\.0\.attn\.proj\.bias'"):
        check_same_layout(weights, model, checkpoint_path)


def test_resume_needs_a_checkpoint_and_a_new_run_needs_an_empty_folder(setup, tmp_path):
    with pytest.raises(DistilleryError, match="no checkpoint"):
        run(setup["config"].replace(out=str(tmp_path / "nothing")), resume=True, progress=False)
    with pytest.raises(DistilleryError, match="--resume"):
        run(setup["config"], progress=False)
