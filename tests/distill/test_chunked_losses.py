"""Chunked vocabulary losses fused with the head == the plain losses on full logits, in value and gradient."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import save_tiny_bert
from tiny_run import make_data, make_roberta, make_student, make_teacher_student
from torch import nn

from distillery.cli import main
from distillery.distill import losses
from distillery.distill.chunked_losses import VocabLosses, fused_vocab_losses
from distillery.distill.data import TokenDataset
from distillery.distill.run_config import RunConfig
from distillery.distill.trainer import Batch, batch_loss, load_lm, make_batch, prepare_teacher, run
from distillery.models.common import DistilleryError
from distillery.tokenizer import load_tokenizer

N, C, C_T, V = 10, 6, 8, 37


def plain_total(s, t, targets, kd_rows, spec: VocabLosses):
    """The reference: every term from losses.py on the full logits, weighted as `spec` says."""
    T, mask = spec.temperature, kd_rows
    terms = {}
    if "lm" in spec.weights:
        terms["lm"] = losses.causal_lm_loss(s, targets)
    if "kd" in spec.weights:
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "gjsd": spec.beta}[spec.kd_loss]
        terms["kd"] = losses.generalized_jsd(s, t, beta, T, mask)
    if "mse" in spec.weights:
        terms["mse"] = losses.logits_mse(s, t, mask)
    return sum(spec.weights[k] * v for k, v in terms.items()), terms


def case(seed: int = 0, bias: bool = True, ignored: float = 0.3, kd_fraction: float | None = 0.6):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    head = nn.Linear(C, V, bias=bias)
    teacher_head = nn.Linear(C_T, V)
    with torch.no_grad():
        for p in list(head.parameters()) + list(teacher_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    teacher_hidden = torch.randn(N, C_T, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignored] = losses.IGNORE_INDEX
    kd_rows = None if kd_fraction is None else torch.rand(N, generator=g) < kd_fraction
    return hidden, head, teacher_hidden, teacher_head, targets, kd_rows


def compare(spec: VocabLosses, bias=True, ignored=0.3, kd_fraction=0.6, seed=0, scale=1.0):
    hidden, head, teacher_hidden, teacher_head, targets, kd_rows = case(seed, bias, ignored, kd_fraction)

    def run(fused: bool):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        if fused:
            total, terms = fused_vocab_losses(h, head.weight, head.bias, targets, spec, teacher_hidden, teacher_head,
                                              kd_rows)
        else:
            with torch.no_grad():
                t = teacher_head(teacher_hidden)
            total, terms = plain_total(head(h), t, targets, kd_rows, spec)
        (scale * total).backward()
        grads = [h.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        return total.detach(), {k: v.detach() for k, v in terms.items()}, [g.clone() for g in grads]

    total, terms, grads = run(fused=True)
    ref_total, ref_terms, ref_grads = run(fused=False)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert terms.keys() == ref_terms.keys()
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * scale)
    return terms


SPECS = {
    "lm": dict(weights={"lm": 1.0}),
    "forward_kl": dict(weights={"kd": 1.0}, kd_loss="forward_kl"),
    "reverse_kl": dict(weights={"kd": 1.0}, kd_loss="reverse_kl"),
    "gjsd": dict(weights={"kd": 1.0}, kd_loss="gjsd", beta=0.3),
    "gjsd_beta_0": dict(weights={"kd": 1.0}, kd_loss="gjsd", beta=0.0),
    "gjsd_beta_1": dict(weights={"kd": 1.0}, kd_loss="gjsd", beta=1.0),
    "mse": dict(weights={"mse": 1.0}),
    "combined": dict(weights={"lm": 2.0, "kd": 5.0, "mse": 0.5}, kd_loss="forward_kl"),
    "combined_gjsd": dict(weights={"lm": 0.7, "kd": 1.3, "mse": 0.2}, kd_loss="gjsd", beta=0.6),
}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("chunk_size", [3, 5, 64])  # divides N or not, and larger than N
def test_chunked_equals_plain_in_value_and_gradient(name, chunk_size):
    spec = VocabLosses(**SPECS[name], temperature=2.0, chunk_size=chunk_size)
    compare(spec)


@pytest.mark.parametrize("name", ["lm", "forward_kl", "reverse_kl", "gjsd", "mse"])
def test_temperature_one_no_bias_and_every_position(name):
    spec = VocabLosses(**SPECS[name], temperature=1.0, chunk_size=4)
    compare(spec, bias=False, ignored=0.0, kd_fraction=None)


def test_masked_lm_mostly_ignored_targets():
    # An MLM batch with every position in the soft targets but the LM loss on a few (~15 %).
    spec = VocabLosses(weights={"lm": 2.0, "kd": 5.0}, temperature=2.0, chunk_size=4)
    terms = compare(spec, ignored=0.85, kd_fraction=None, seed=3)
    assert terms["lm"] > 0


def test_the_outer_gradient_scales_the_result():
    # A loss scaler (or any factor on the total) reaches the accumulated gradients.
    compare(VocabLosses(**SPECS["combined"], temperature=2.0, chunk_size=3), scale=128.0)


def test_zero_weight_term_is_reported_but_has_no_gradient():
    spec = VocabLosses(weights={"lm": 0.0, "kd": 1.0}, temperature=2.0, chunk_size=4)
    terms = compare(spec)
    assert terms["lm"] > 0


def test_nothing_counted_gives_zero_not_nan():
    hidden, head, teacher_hidden, teacher_head, targets, _ = case()
    spec = VocabLosses(**SPECS["combined"], temperature=2.0, chunk_size=4)
    h = hidden.clone().requires_grad_()
    total, terms = fused_vocab_losses(h, head.weight, head.bias, torch.full((N,), -100), spec, teacher_hidden,
                                      teacher_head, torch.zeros(N, dtype=torch.bool))
    total.backward()
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())
    assert h.grad.abs().max() == 0 and head.weight.grad.abs().max() == 0
    empty = torch.zeros(0, C, requires_grad=True)
    total, _ = fused_vocab_losses(empty, head.weight, head.bias, torch.zeros(0, dtype=torch.long), spec,
                                  torch.zeros(0, C_T), teacher_head)
    total.backward()
    assert total.item() == 0.0


def test_without_gradients_the_values_are_the_same():
    hidden, head, teacher_hidden, teacher_head, targets, kd_rows = case()
    spec = VocabLosses(**SPECS["combined_gjsd"], temperature=2.0, chunk_size=3)
    args = (head.weight, head.bias, targets, spec, teacher_hidden, teacher_head, kd_rows)
    with_grad = fused_vocab_losses(hidden.clone().requires_grad_(), *args)
    with torch.no_grad():
        without = fused_vocab_losses(hidden, *args)
    torch.testing.assert_close(without[0], with_grad[0].detach())
    assert without[1].keys() == with_grad[1].keys()


def test_bf16_teacher_logits_are_computed_in_float32():
    hidden, head, teacher_hidden, teacher_head, targets, kd_rows = case()
    spec = VocabLosses(weights={"kd": 1.0}, temperature=2.0, chunk_size=4)
    low = teacher_head.to(torch.bfloat16)
    total, _ = fused_vocab_losses(hidden, head.weight, head.bias, targets, spec, teacher_hidden.bfloat16(), low,
                                  kd_rows)
    with torch.no_grad():
        expected, _ = plain_total(head(hidden), low(teacher_hidden.bfloat16()).float(), targets, kd_rows, spec)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_head_runs_in_low_precision_and_agrees(dtype):
    # As on a GPU with --precision bf16/fp16: the products in the autocast dtype, the losses in float32.
    hidden, head, teacher_hidden, teacher_head, targets, kd_rows = case()
    spec = VocabLosses(**SPECS["combined"], temperature=2.0, chunk_size=4)
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            if fused:
                total, _ = fused_vocab_losses(h, head.weight, head.bias, targets, spec, teacher_hidden, teacher_head,
                                              kd_rows)
            else:
                with torch.no_grad():
                    t = teacher_head(teacher_hidden)
                total, _ = plain_total(head(h), t, targets, kd_rows, spec)
        total.backward()
        assert total.dtype == torch.float32 and h.grad.dtype == head.weight.grad.dtype == torch.float32
        results.append((total.detach(), h.grad, head.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)

# ----------------------------------------------------------------------------------------------
# In the trainer: the chunked path gives the plain path's losses and gradients


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    return make_teacher_student(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def roberta_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("roberta")
    data = make_data(root, style="roberta")
    teacher = make_roberta(root / "teacher", root / "tokenizer", dropout=0.0, num_hidden_layers=2)
    return {"root": root, "data": data, "teacher": teacher, "student": make_student(teacher, root / "student")}


@pytest.fixture(scope="module")
def distilbert_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilbert")
    data = make_data(root, style="bert")
    tokenizer = load_tokenizer(root / "tokenizer")
    teacher = save_tiny_bert(root / "teacher", "DistilBertForMaskedLM", vocab_size=tokenizer.vocab_size,
                             pad_token_id=tokenizer.pad_token_id, dropout=0.0, attention_dropout=0.0)
    tokenizer.save_pretrained(teacher)
    return {"root": root, "data": data, "teacher": teacher, "student": make_student(teacher, root / "student")}


def loss_and_grads(setup, causal: bool, config: RunConfig, batch: Batch):
    teacher, student = load_lm(str(setup["teacher"])).eval(), load_lm(str(setup["student"])).train()
    scales = {"lm": 0.7, "kd": 1.3, "cos": 0.4, "mse": 0.2}
    loss, terms = batch_loss(student, teacher, batch, causal, config, None, scales)
    loss.backward()
    return loss.detach(), terms, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("kind, kd_masked_only, kd_loss", [
    ("gpt2", False, "forward_kl"), ("gpt2", False, "gjsd"), ("roberta", False, "reverse_kl"),
    ("roberta", True, "forward_kl"), ("distilbert", False, "forward_kl")])
def test_batch_loss_chunked_equals_plain(kind, kd_masked_only, kd_loss, request):
    setup = request.getfixturevalue(f"{kind}_setup")
    causal = kind == "gpt2"
    config = RunConfig(alpha_mse=0.2, kd_loss=kd_loss, kd_masked_only=kd_masked_only, loss_chunk_size=7,
                       temperature=2.5, seq_len=16)
    tokenizer = load_tokenizer(setup["root"] / "tokenizer")
    windows = TokenDataset(setup["data"], "train").batch(3, 16, torch.Generator().manual_seed(0))
    weights = None if causal else torch.ones(tokenizer.vocab_size)
    batch = make_batch(windows, causal, config, tokenizer, weights, torch.Generator().manual_seed(1))
    plain = loss_and_grads(setup, causal, config.replace(chunked_loss=False), batch)
    chunked = loss_and_grads(setup, causal, config, batch)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-6)
    assert chunked[1].keys() == plain[1].keys() == {"lm", "kd", "mse", "cos"}
    for name in plain[1]:
        torch.testing.assert_close(chunked[1][name], plain[1][name], rtol=1e-5, atol=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def run_losses(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def distill_config(setup, out, **overrides) -> RunConfig:
    settings = {**dict(max_steps=2, batch_size=4, seq_len=16, warmup_steps=1, eval_every=2, save_every=2,
                       log_every=1, eval_batches=2, plot=False), **overrides}
    return RunConfig(kind="distill", teacher=str(setup["teacher"]), student=str(setup["student"]),
                     data=str(setup["data"]), out=str(out), **settings)


def test_a_run_with_chunks_logs_the_plain_runs_losses(gpt2_setup, tmp_path):
    plain = run(distill_config(gpt2_setup, tmp_path / "plain", chunked_loss=False), progress=False)
    chunked = run(distill_config(gpt2_setup, tmp_path / "chunked", loss_chunk_size=5), progress=False)
    for a, b in zip(run_losses(tmp_path / "plain"), run_losses(tmp_path / "chunked"), strict=True):
        for key in ("loss", "lm", "kd", "cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key  # kd is ~4e-4 here
    assert chunked["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_a_cheaper_teacher_runs_and_stays_close(dtype, gpt2_setup, tmp_path):
    fp32 = run(distill_config(gpt2_setup, tmp_path / "fp32", max_steps=1), progress=False)
    cheap = run(distill_config(gpt2_setup, tmp_path / dtype, max_steps=1, teacher_dtype=dtype), progress=False)
    first, first_cheap = run_losses(tmp_path / "fp32")[0], run_losses(tmp_path / dtype)[0]
    assert first_cheap["lm"] == pytest.approx(first["lm"], rel=1e-6)  # the student is the same
    assert first_cheap["kd"] == pytest.approx(first["kd"], rel=0.2, abs=1e-3)
    assert first_cheap["kd"] != first["kd"]
    assert math.isfinite(cheap["val_loss"]) and math.isfinite(fp32["val_loss"])


def test_a_chunk_size_of_zero_is_one_sentence(gpt2_setup, tmp_path, capsys):
    for bad in ("0", "-3"):
        code = main(["distill", "--teacher", str(gpt2_setup["teacher"]), "--student", str(gpt2_setup["student"]),
                     "--data", str(gpt2_setup["data"]), "--out", str(tmp_path / "run"), "--loss-chunk-size", bad])
        err = capsys.readouterr().err
        assert code == 2 and "--loss-chunk-size" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    for bad in (0, -3):  # from a YAML file
        with pytest.raises(DistilleryError, match="loss_chunk_size must be a positive integer"):
            RunConfig(loss_chunk_size=bad)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_compiled_student_logs_the_same_losses(gpt2_setup, tmp_path):
    eager = run(distill_config(gpt2_setup, tmp_path / "eager"), progress=False)
    compiled = run(distill_config(gpt2_setup, tmp_path / "compiled", compile=True), progress=False)
    for a, b in zip(run_losses(tmp_path / "eager"), run_losses(tmp_path / "compiled"), strict=True):
        for key in ("loss", "lm", "kd", "cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-5)


def test_an_int8_teacher_off_the_cpu_is_one_sentence(gpt2_setup):
    with pytest.raises(DistilleryError, match="--teacher-dtype int8 runs on the CPU only.*bf16"):
        prepare_teacher(load_lm(str(gpt2_setup["teacher"])), "int8", torch.device("cuda"))
