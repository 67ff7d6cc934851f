"""Two CPU processes under torchrun (gloo) train exactly what one process trains at the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_run import make_data, make_gpt2, make_student

from distillery.distill.run_config import RunConfig
from distillery.distill.trainer import load_checkpoint, run

SETTINGS = dict(max_steps=3, batch_size=8, seq_len=16, warmup_steps=1, eval_every=3, save_every=3, log_every=1,
                eval_batches=2)


def train_records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_at_half_the_batch_match_one_process(tmp_path):
    data = make_data(tmp_path)
    # No dropout: each process draws its own dropout masks, which one process would draw differently.
    teacher = make_gpt2(tmp_path / "teacher", tmp_path / "tokenizer", dropout=0.0, n_layer=2)
    student = make_student(teacher, tmp_path / "student")
    config = RunConfig(kind="distill", teacher=str(teacher), student=str(student), data=str(data),
                       out=str(tmp_path / "one"), plot=False, **SETTINGS)
    run(config, progress=False)

    flags = ["--teacher", str(teacher), "--student", str(student), "--data", str(data), "--out",
             str(tmp_path / "two"), "--no-plot", "--grad-accum", "2"]  # per process: 2 micro-batches of 2
    for name, value in SETTINGS.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "distillery.cli", "distill", *flags],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]

    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "lm", "kd", "cos", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    ours, theirs = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert len(theirs["rng"]) == 2  # each process's random states, to resume each one
    for name, tensor in ours["model"].items():
        torch.testing.assert_close(theirs["model"][name], tensor, atol=1e-5, rtol=1e-4)
