"""The offline teacher: the sparse KD loss, building and resuming a cache, distilling from it, refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import save_tiny_roberta
from tiny_run import make_gpt2, make_teacher_student

from distillery.cli import main
from distillery.distill import losses, teacher_cache
from distillery.distill.data import TokenDataset
from distillery.distill.run_config import RunConfig
from distillery.distill.teacher_cache import TeacherCache, build_cache, sparse_kd_loss, teacher_outputs
from distillery.distill.trainer import load_lm, run
from distillery.models.common import DistilleryError

SEQ = 16
RUN = dict(max_steps=1, batch_size=4, seq_len=SEQ, warmup_steps=0, eval_every=1, save_every=1, log_every=1,
           eval_batches=1, plot=False, device="cpu", alpha_mse=0.0)


def top_k_of(logits: torch.Tensor, k: int):
    """(ids, logprobs, tail) as the cache stores them (in float32, or float64 given float64)."""
    log_p = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    return ids, values, torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1)


# ----------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sparse_kd_with_every_id_is_the_dense_forward_kl(temperature):
    torch.manual_seed(0)
    s = torch.randn(2, 5, 40, requires_grad=True)
    t = torch.randn(2, 5, 40) * 3
    ids, logprobs, tail = top_k_of(t, 40)
    assert torch.isinf(tail).all()
    sparse = sparse_kd_loss(s, ids, logprobs, tail, temperature)
    dense = losses.soft_target_kl(s, t, temperature)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    (g_dense,) = torch.autograd.grad(dense, s)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(g_sparse, g_dense, atol=1e-6, rtol=1e-4)


def test_sparse_kd_is_the_kl_over_k_plus_one_buckets():
    torch.manual_seed(1)
    s, t = torch.randn(7, 30, dtype=torch.float64), torch.randn(7, 30, dtype=torch.float64) * 2
    k = 5
    ids, logprobs, tail = top_k_of(t, k)
    # The tail bucket holds exactly the teacher's mass outside the k ids.
    p_t = torch.softmax(t, -1)
    torch.testing.assert_close(tail.exp(), 1 - p_t.gather(-1, ids).sum(-1))
    # By hand, in float64: both distributions coarsened to (k ids, everything else).
    p_s = torch.softmax(s, -1)
    q_t = torch.cat([p_t.gather(-1, ids), 1 - p_t.gather(-1, ids).sum(-1, keepdim=True)], -1)
    q_s = torch.cat([p_s.gather(-1, ids), 1 - p_s.gather(-1, ids).sum(-1, keepdim=True)], -1)
    expected = (q_t * (q_t / q_s).log()).sum(-1).mean()
    torch.testing.assert_close(sparse_kd_loss(s.float(), ids, logprobs, tail), expected.float(), atol=1e-6, rtol=1e-5)
    # A lower bound of the full KL (coarsening loses information), 0 for the teacher itself.
    assert sparse_kd_loss(s, ids, logprobs, tail) <= losses.soft_target_kl(s, t, 1.0) + 1e-6
    assert abs(float(sparse_kd_loss(t, ids, logprobs, tail))) < 1e-6


def test_sparse_kd_coarsens_then_softens():
    """At T != 1 both sides' buckets, taken at T = 1, are softened alike: softmax(a / T)."""
    torch.manual_seed(2)
    s, t = torch.randn(3, 20), torch.randn(3, 20)
    ids, logprobs, tail = top_k_of(t, 4)
    T = 2.0
    log_q_t = torch.log_softmax(torch.cat([logprobs, tail[:, None]], -1) / T, -1)
    z = torch.log_softmax(s, -1)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter(-1, ids, True)
    a_s = torch.cat([z.gather(-1, ids), torch.logsumexp(z.masked_fill(in_top, -math.inf), -1, keepdim=True)], -1)
    log_q_s = torch.log_softmax(a_s / T, -1)
    expected = T**2 * (log_q_t.exp() * (log_q_t - log_q_s)).sum(-1).mean()
    torch.testing.assert_close(sparse_kd_loss(s, ids, logprobs, tail, T), expected)
    assert abs(float(sparse_kd_loss(t, ids, logprobs, tail, T))) < 1e-6  # the teacher itself: 0 at every T


def test_float16_log_probs_cost_little():
    """float16 storage of the log-probs of a peaked distribution: the loss moves by under 1e-3."""
    torch.manual_seed(3)
    s, t = torch.randn(64, 300), torch.randn(64, 300) * 4
    ids, logprobs, tail = top_k_of(t, 16)
    assert (logprobs.half().float() - logprobs).abs().max() < 0.01
    full = sparse_kd_loss(s, ids, logprobs, tail)
    half = sparse_kd_loss(s, ids, logprobs.half(), tail)
    assert abs(float(full - half)) < 1e-3


@pytest.mark.parametrize("temperature, k", [(2.0, 6), (1.0, 1), (0.5, 50), (10.0, 50)])
def test_fused_sparse_kd_equals_the_plain_one_with_its_gradients(temperature, k):
    from torch import nn

    from distillery.distill.chunked_losses import VocabLosses, fused_vocab_losses

    torch.manual_seed(4)
    head = nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    targets[0, 3] = -100
    ids, logprobs, tail = top_k_of(torch.randn(2, 7, 50) * 3, k)  # k = 50: every id, an empty tail
    logits = head(hidden)
    plain = {"lm": losses.causal_lm_loss(logits, targets),
             "kd": sparse_kd_loss(logits, ids, logprobs.half(), tail, temperature)}
    spec = VocabLosses({"lm": 1.0, "kd": 3.0}, "sparse", temperature, chunk_size=4)
    sparse = (ids.reshape(-1, k), logprobs.half().reshape(-1, k), tail.reshape(-1))
    total, fused = fused_vocab_losses(hidden.flatten(0, 1), head.weight, None, targets.flatten(), spec,
                                      sparse_targets=sparse)
    for name in ("lm", "kd"):
        torch.testing.assert_close(fused[name], plain[name].detach(), atol=1e-6, rtol=1e-5)
    wanted = (hidden, head.weight)
    torch.testing.assert_close(torch.autograd.grad(total, wanted),
                               torch.autograd.grad(plain["lm"] + 3 * plain["kd"], wanted), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Building


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_teacher_student(tmp_path_factory.mktemp("cache"))


def cache_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_then_resume_after_a_crash_gives_the_same_bytes(setup, tmp_path, monkeypatch):
    options = dict(seq_len=SEQ, hidden=True, windows=10, shard_windows=3, batch_size=2, progress=False)
    whole = build_cache(str(setup["teacher"]), setup["data"], tmp_path / "whole", 8, **options)
    assert whole["shards"] == 4 and whole["windows"] == 10 and whole["tokens"] == 10 * SEQ
    # 8 uint16 ids + 8 float16 log-probs + a float32 tail + 32 float16 hidden values.
    assert whole["bytes_per_token"] == 8 * 2 + 8 * 2 + 4 + 32 * 2

    written = []
    real = teacher_cache.write_shard

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        real(*args, **kwargs)
        written.append(args[3])

    monkeypatch.setattr(teacher_cache, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_cache(str(setup["teacher"]), setup["data"], tmp_path / "resumed", 8, **options)
    with pytest.raises(DistilleryError, match="unfinished"):
        TeacherCache(tmp_path / "resumed")
    monkeypatch.setattr(teacher_cache, "write_shard", real)
    again = build_cache(str(setup["teacher"]), setup["data"], tmp_path / "resumed", 8, **options)
    assert again["shards_computed"] == 2
    assert cache_files(tmp_path / "resumed") == cache_files(tmp_path / "whole")

    # What is stored is the teacher's top-k of window 4 (shard 1, row 1).
    cache = TeacherCache(tmp_path / "whole")
    tokens = TokenDataset(setup["data"]).tokens
    window = cache.windows(tokens, torch.tensor([4]))
    ids, values, tail, hidden = teacher_outputs(load_lm(str(setup["teacher"])).eval(), window[:, :-1], 8, True)
    stored = cache.targets(torch.tensor([4]))
    assert torch.equal(stored.ids, ids)
    torch.testing.assert_close(stored.logprobs, values, atol=5e-3, rtol=1e-3)  # float16
    torch.testing.assert_close(stored.tail, tail)
    torch.testing.assert_close(stored.hidden, hidden, atol=5e-3, rtol=1e-3)
    assert np.load(tmp_path / "whole" / "shard-00001.ids.npy").dtype == np.uint16


@pytest.mark.parametrize("chunked", [True, False])
def test_distill_from_a_full_cache_starts_from_the_online_forward_kl(setup, tmp_path, chunked):
    """k = V, float32: the first step's KD term is the dense forward KL on the windows it drew."""
    V = load_lm(str(setup["teacher"])).config.vocab_size
    build_cache(str(setup["teacher"]), setup["data"], tmp_path / "cache", V, seq_len=SEQ, logprob_dtype="float32",
                windows=12, shard_windows=5, progress=False)
    config = RunConfig(kind="distill", data=str(setup["data"]), out=str(tmp_path / "run"), student=str(setup["student"]),
                       teacher_cache=str(tmp_path / "cache"), alpha_cos=0.0, chunked_loss=chunked,
                       loss_chunk_size=24, **RUN)
    summary = run(config, progress=False)
    assert summary["steps"] == 1 and math.isfinite(summary["val_loss"])
    first = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())

    cache = TeacherCache(tmp_path / "cache")
    indices = cache.draw(RUN["batch_size"], torch.Generator().manual_seed(config.seed))
    windows = cache.windows(TokenDataset(setup["data"]).tokens, indices)
    with torch.no_grad():
        s = load_lm(str(setup["student"])).eval()(windows[:, :-1]).logits
        t = load_lm(str(setup["teacher"])).eval()(windows[:, :-1]).logits
    assert first["kd"] == pytest.approx(float(losses.soft_target_kl(s, t, config.temperature)), abs=1e-5)


def test_distill_from_cache_with_hidden_states_runs_the_cosine(setup, tmp_path):
    build_cache(str(setup["teacher"]), setup["data"], tmp_path / "cache", 4, seq_len=SEQ, hidden=True, windows=6,
                progress=False)
    assert main(["distill", "--teacher-cache", str(tmp_path / "cache"), "--student", str(setup["student"]),
                 "--data", str(setup["data"]), "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", str(SEQ), "--warmup-steps", "0", "--eval-batches", "1", "--no-plot"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in records[0] for k in ("kd", "lm", "cos"))


# ----------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def small_cache(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small") / "cache"
    build_cache(str(setup["teacher"]), setup["data"], folder, 4, seq_len=SEQ, windows=4, progress=False)
    return folder


def distill_argv(setup, cache, out, *extra):
    return ["distill", "--teacher-cache", str(cache), "--student", str(setup["student"]), "--data", str(setup["data"]),
            "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--seq-len", str(SEQ), "--alpha-cos", "0",
            "--no-plot", *extra]


def refused(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err, err
    return err


def test_refuses_another_dataset_tokenizer_and_sequence_length(setup, small_cache, tmp_path, capsys):
    other_data = tmp_path / "other"
    shutil.copytree(setup["data"], other_data)
    meta = json.loads((other_data / "meta.json").read_text())
    meta["seed"] = 99  # another split of the same text: other data
    (other_data / "meta.json").write_text(json.dumps(meta))
    argv = distill_argv(setup, small_cache, tmp_path / "a")
    refused(capsys, [*argv[:6], str(other_data), *argv[7:]], "other data")
    refused(capsys, distill_argv(setup, small_cache, tmp_path / "b", "--seq-len", "8"), "--seq-len 16")

    tampered = tmp_path / "tampered"
    shutil.copytree(small_cache, tampered)
    meta = json.loads((tampered / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 64
    (tampered / "meta.json").write_text(json.dumps(meta))
    refused(capsys, distill_argv(setup, tampered, tmp_path / "c"), "another tokenizer")


def test_refuses_teacher_and_cache_together_and_a_missing_hidden_state(setup, small_cache, tmp_path, capsys):
    refused(capsys, distill_argv(setup, small_cache, tmp_path / "a", "--teacher", str(setup["teacher"])),
            "pass one of them")
    argv = distill_argv(setup, small_cache, tmp_path / "b")
    refused(capsys, [*argv[:-3], "--alpha-cos", "1", "--no-plot"], "no hidden states")
    refused(capsys, [*argv[:-3], "--alpha-cos", "1", "--cos-layers", "mapped"], "last hidden states only")
    refused(capsys, distill_argv(setup, small_cache, tmp_path / "c", "--kd-loss", "reverse_kl"), "forward_kl only")
    refused(capsys, distill_argv(setup, setup["data"], tmp_path / "d"), "is not a teacher cache")


def test_cache_command_refusals(setup, small_cache, tmp_path, capsys):
    base = ["teacher-cache", str(setup["teacher"]), "--data", str(setup["data"]), "--seq-len", str(SEQ),
            "--windows", "2"]
    refused(capsys, [*base, "--out", str(tmp_path / "a"), "--top-k", "0"], "--top-k")
    refused(capsys, [*base, "--out", str(tmp_path / "b"), "--top-k", "100000"], "vocabulary of")
    refused(capsys, [*base, "--out", str(tmp_path / "c"), "--seq-len", "65"], "positions")
    # The cache of another teacher (or any other setting) is not resumed over, nor replaced without --overwrite.
    other = make_gpt2(tmp_path / "other_teacher", setup["root"] / "tokenizer", dropout=0.0, n_layer=2, seed=1)
    folder = tmp_path / "d"
    shutil.copytree(small_cache, folder)
    refused(capsys, ["teacher-cache", str(other), "--data", str(setup["data"]), "--seq-len", str(SEQ), "--windows", "4",
                     "--top-k", "4", "--out", str(folder)], "teacher_fingerprint differs")
    assert main(["teacher-cache", str(other), "--data", str(setup["data"]), "--seq-len", str(SEQ), "--windows", "4",
                 "--top-k", "4", "--out", str(folder), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards_computed"] == 1
    refused(capsys, [*base, "--out", str(setup["data"]), "--top-k", "4"], "other than a teacher cache")
    roberta = save_tiny_roberta(tmp_path / "roberta", vocab_size=400)
    refused(capsys, ["teacher-cache", str(roberta), "--data", str(setup["data"]), "--out", str(tmp_path / "e")],
            "masked LM")


def test_sentence_data_is_refused_with_what_it_is_for(setup, tmp_path, capsys):
    """A folder of `prepare --sentences` is named as sentence data, for the cache and a token objective alike."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} says a little more." for i in range(40)), encoding="utf-8")
    assert main(["prepare", str(corpus), "--sentences", "--val-sentences", "4", "--out", str(tmp_path / "sentences")]) == 0
    words = "holds sentence data for embedding distillation (made by `distillery prepare --sentences`); this needs " \
            "token data"
    refused(capsys, ["teacher-cache", str(setup["teacher"]), "--data", str(tmp_path / "sentences"), "--out",
                     str(tmp_path / "cache"), "--seq-len", str(SEQ), "--windows", "2"], words)
    refused(capsys, ["distill", "--teacher", str(setup["teacher"]), "--student", str(setup["student"]), "--data",
                     str(tmp_path / "sentences"), "--out", str(tmp_path / "run"), "--max-steps", "1", "--seq-len",
                     str(SEQ), "--no-plot"], words)


# ----------------------------------------------------------------------------------------------
# Resuming a run, and two processes


def test_a_run_from_cache_resumes_exactly(setup, small_cache, tmp_path):
    settings = dict(RUN, max_steps=2, alpha_cos=0.0)
    common = dict(kind="distill", data=str(setup["data"]), student=str(setup["student"]),
                  teacher_cache=str(small_cache))
    run(RunConfig(out=str(tmp_path / "straight"), **common, **settings), progress=False)
    run(RunConfig(out=str(tmp_path / "stopped"), **common, **{**settings, "max_steps": 1}), progress=False)
    run(RunConfig(out=str(tmp_path / "stopped"), **common, **settings), resume=True, progress=False)
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)] for name in ("straight", "stopped")}
    assert records["stopped"][-1]["step"] == 2
    assert records["stopped"][-1]["kd"] == pytest.approx(records["straight"][-1]["kd"], rel=1e-6)


def test_two_processes_build_the_same_cache_and_train_the_same_steps(setup, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "distillery.cli"]
    options = dict(seq_len=SEQ, hidden=True, windows=7, shard_windows=2, progress=False)
    build_cache(str(setup["teacher"]), setup["data"], tmp_path / "one", 4, **options)
    launched = subprocess.run([*torchrun, "teacher-cache", str(setup["teacher"]), "--data", str(setup["data"]),
                               "--out", str(tmp_path / "two"), "--top-k", "4", "--seq-len", str(SEQ), "--hidden",
                               "--windows", "7", "--shard-windows", "2"], env=env, capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert cache_files(tmp_path / "two") == cache_files(tmp_path / "one")

    settings = dict(RUN, max_steps=2, batch_size=4)
    run(RunConfig(kind="distill", data=str(setup["data"]), student=str(setup["student"]), out=str(tmp_path / "run1"),
                  teacher_cache=str(tmp_path / "one"), **settings), progress=False)
    flags = ["distill", "--teacher-cache", str(tmp_path / "one"), "--student", str(setup["student"]), "--data",
             str(setup["data"]), "--out", str(tmp_path / "run2"), "--no-plot", "--alpha-mse", "0"]
    for name, value in settings.items():
        if name not in ("plot", "alpha_mse"):
            flags += ["--" + name.replace("_", "-"), str(value)]
    launched = subprocess.run([*torchrun, *flags], env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("run1", "run2"))
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "lm", "kd", "cos", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
