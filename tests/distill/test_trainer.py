"""The training loop: schedules, optimizer groups, loss wiring, outputs, and its refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import save_tiny_bert
from tiny_run import make_data, make_gpt2, make_roberta, make_student, make_teacher_student

from distillery.cli import main
from distillery.distill import losses
from distillery.distill.data import TokenDataset
from distillery.distill.run_config import RunConfig
from distillery.distill.trainer import (
    Batch,
    build_from_preset,
    is_preset,
    kd_loss,
    load_lm,
    loss_terms,
    lr_factor,
    make_optimizer,
    run,
)
from distillery.models.common import DistilleryError
from distillery.tokenizer import load_tokenizer

TINY = dict(max_steps=4, batch_size=4, seq_len=16, warmup_steps=1, eval_every=2, save_every=2, log_every=1,
            eval_batches=2, plot=False)


@pytest.fixture(scope="module")
def gpt2_setup(tmp_path_factory):
    return make_teacher_student(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def roberta_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("roberta")
    data = make_data(root, style="roberta")
    teacher = make_roberta(root / "teacher", root / "tokenizer", dropout=0.0, num_hidden_layers=2)
    return {"root": root, "data": data, "teacher": teacher, "student": make_student(teacher, root / "student")}


@pytest.fixture(scope="module", params=["bert", "distilbert"])
def bert_setup(request, tmp_path_factory):
    """A trained WordPiece tokenizer, its data, a tiny BERT or DistilBERT masked LM teacher and its student."""
    root = tmp_path_factory.mktemp(request.param)
    data = make_data(root, style="bert")
    tokenizer = load_tokenizer(root / "tokenizer")
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if request.param == "bert" \
        else dict(dropout=0.0, attention_dropout=0.0)
    cls_name = {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM"}[request.param]
    teacher = save_tiny_bert(root / "teacher", cls_name, vocab_size=tokenizer.vocab_size,
                             pad_token_id=tokenizer.pad_token_id, **no_dropout)
    tokenizer.save_pretrained(teacher)
    return {"root": root, "data": data, "teacher": teacher, "student": make_student(teacher, root / "student"),
            "class": cls_name}


def distill_config(setup, out, **overrides) -> RunConfig:
    settings = {**TINY, **overrides}
    return RunConfig(kind="distill", teacher=str(setup["teacher"]), student=str(setup["student"]),
                     data=str(setup["data"]), out=str(out), **settings)


def train_losses(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_warmup_then_decay_to_min_ratio(schedule):
    config = RunConfig(max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(55, config) == pytest.approx(0.55)  # half way: both shapes give the midpoint
    assert lr_factor(100, config) == pytest.approx(0.1)
    factors = [lr_factor(s, config) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_no_weight_decay_on_biases_and_layernorms(gpt2_setup):
    model = load_lm(str(gpt2_setup["teacher"]))
    optimizer = make_optimizer(model, RunConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or ".ln" in names[id(p)] or names[id(p)].startswith("ln_f")
               for p in plain["params"])
    assert any(names[id(p)] == "wte.weight" for p in decayed["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------
# Losses


def test_a_student_equal_to_its_teacher_has_zero_distillation_losses(gpt2_setup):
    teacher = load_lm(str(gpt2_setup["teacher"])).eval()
    student = load_lm(str(gpt2_setup["teacher"])).eval()
    windows = TokenDataset(gpt2_setup["data"], "train").batch(2, 16, torch.Generator().manual_seed(0))
    batch = Batch(windows[:, :-1], windows[:, 1:], None)
    config = RunConfig(alpha_mse=1.0, cos_layers="mapped", layer_map=[0, 1])
    terms = loss_terms(student, teacher, batch, True, config, [0, 1])
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["mse"].item() == pytest.approx(0.0, abs=1e-10)
    expected = torch.nn.functional.cross_entropy(student(batch.inputs).logits.flatten(0, 1), batch.targets.flatten())
    assert terms["lm"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["kd"].backward()  # the teacher's inference-mode outputs may be saved for backward


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_gradient_accumulation_gives_the_same_losses(kind, gpt2_setup, roberta_setup, tmp_path):
    # Masked batches put different numbers of masked tokens in each micro-batch; the loss is
    # still the mean over the whole batch.
    setup = gpt2_setup if kind == "gpt2" else roberta_setup
    whole = run(distill_config(setup, tmp_path / "whole", max_steps=2, alpha_mse=0.5), progress=False)
    split = run(distill_config(setup, tmp_path / "split", max_steps=2, alpha_mse=0.5, grad_accum=4),
                progress=False)
    for a, b in zip(train_losses(tmp_path / "whole"), train_losses(tmp_path / "split"), strict=True):
        for key in ("loss", "lm", "kd", "cos", "mse"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert whole["val_loss"] == pytest.approx(split["val_loss"], rel=1e-5)


def test_kd_loss_setting_picks_the_divergence():
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    expected = {"forward_kl": losses.soft_target_kl(s, t, 3.0, mask), "reverse_kl": losses.reverse_kl(s, t, 3.0, mask),
                "gjsd": losses.generalized_jsd(s, t, 0.3, 3.0, mask)}
    for name, value in expected.items():
        assert kd_loss(s, t, mask, RunConfig(kd_loss=name, temperature=3.0, beta=0.3)) == value
    assert len({float(v) for v in expected.values()}) == 3


# ----------------------------------------------------------------------------------------------
# What a run leaves behind


def test_train_from_a_preset_through_the_cli(gpt2_setup, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "gpt2", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                 "--n-positions", "32", "--data", str(gpt2_setup["data"]), "--out", str(out),
                 "--max-steps", "12", "--batch-size", "8", "--seq-len", "16", "--lr", "3e-3",
                 "--warmup-steps", "2", "--eval-every", "6", "--save-every", "6", "--eval-batches", "2", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    vocab = load_tokenizer(gpt2_setup["root"] / "tokenizer").vocab_size
    assert summary["steps"] == 12 and summary["val_ppl"] < vocab  # it learned something
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model_overrides"] == {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32}
    assert saved["lr"] == 3e-3 and saved["kind"] == "train"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_ppl" in r] == [6, 12]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_final_model_loads_in_transformers(gpt2_setup, tmp_path):
    import transformers

    run(distill_config(gpt2_setup, tmp_path, max_steps=2), progress=False)
    ours = load_lm(str(tmp_path / "model")).eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    ids = torch.tensor([[1, 5, 9, 100, 7]])
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "model")("def f():")["input_ids"]


def test_energy_and_co2_are_recorded_and_add_up_over_a_resume(gpt2_setup, tmp_path):
    first = run(distill_config(gpt2_setup, tmp_path, max_steps=2, carbon_region="FRA"), progress=False)
    energy = json.loads((tmp_path / "summary.json").read_text())["energy"]
    assert energy == first["energy"]
    assert energy["hours"] > 0 and energy["kwh"] > 0 and energy["region"] == "FRA"
    assert energy["kg_co2eq"] == pytest.approx(energy["kwh"] * energy["carbon_intensity_g_per_kwh"] / 1000)
    second = run(distill_config(gpt2_setup, tmp_path, max_steps=4, carbon_region="FRA"), resume=True,
                 progress=False)
    assert second["energy"]["segments"] == 2 and second["energy"]["hours"] > energy["hours"]


def test_masked_lm_distillation_on_masked_positions_only(roberta_setup, tmp_path):
    import transformers

    summary = run(distill_config(roberta_setup, tmp_path, kd_masked_only=True, cos_layers="mapped"),
                  progress=False)
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    assert transformers.RobertaForMaskedLM.from_pretrained(tmp_path / "model").config.num_hidden_layers == 1


def test_bert_and_distilbert_masked_lm_distillation(bert_setup, tmp_path):
    import transformers

    assert load_lm(str(bert_setup["teacher"])).task == "masked-lm"
    summary = run(distill_config(bert_setup, tmp_path, kd_masked_only=True, cos_layers="mapped", alpha_mse=0.5),
                  progress=False)
    assert summary["steps"] == 4 and math.isfinite(summary["val_loss"])
    losses_seen = train_losses(tmp_path)
    assert all(math.isfinite(r[k]) for r in losses_seen for k in ("lm", "kd", "cos", "mse"))
    student = getattr(transformers, bert_setup["class"]).from_pretrained(tmp_path / "model")
    assert student.config.num_hidden_layers == 1


@pytest.mark.parametrize("name,task,fields", [
    ("distilgpt2", "causal-lm", dict(n_layer=2, n_head=2, n_embd=16, n_inner=None, n_positions=32, bos_token_id=0)),
    ("distilroberta-base", "masked-lm",
     dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=64,
          max_position_embeddings=34, pad_token_id=1, bos_token_id=0)),  # positions start after the pad id
    ("bert-base-uncased", "masked-lm", dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16,
                                            intermediate_size=64, max_position_embeddings=32, pad_token_id=1)),
    ("all-MiniLM-L6-v2", "masked-lm", dict(num_hidden_layers=2, hidden_size=16, max_position_embeddings=32)),
    ("distilbert-base-uncased", "masked-lm",
     dict(n_layers=2, n_heads=2, dim=16, hidden_dim=64, max_position_embeddings=32, pad_token_id=1)),
])
def test_any_family_preset_takes_the_size_flags(name, task, fields):
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(vocab_size=120, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    assert is_preset(name) and not is_preset("bert-tiny") and not is_preset(None)
    model = build_from_preset(name, {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 32}, tokenizer)
    assert model.task == task and model.config.vocab_size == 120
    assert {k: getattr(model.config, k) for k in fields} == fields
    max_tokens = model.config.n_positions if task == "causal-lm" else model.config.max_tokens
    assert max_tokens == 32


def test_yaml_config_with_flags_winning(gpt2_setup, tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "max_steps": 50, "temperature": 4.0, "alpha_cos": 0.0,
                                           "data": str(gpt2_setup["data"])}))
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(gpt2_setup["teacher"]), "--student", str(gpt2_setup["student"]),
                 "--out", str(out), "--config", str(config_file), "--max-steps", "2", "--kd-loss", "gjsd",
                 "--beta", "0.3", "--json"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_steps"], saved["temperature"], saved["alpha_cos"]) == (2, 4.0, 0.0)
    assert (saved["kd_loss"], saved["beta"]) == ("gjsd", 0.3)
    assert "cos" not in train_losses(out)[0]


# ----------------------------------------------------------------------------------------------
# Refusals: one sentence, exit code 2


def test_unknown_yaml_setting_is_named(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("alpha_kd: 1.0\n")
    with pytest.raises(DistilleryError, match="alpha_kd"):
        RunConfig.from_yaml(config_file)


def test_bad_setting_values_are_named():
    with pytest.raises(DistilleryError, match="grad_accum"):
        RunConfig(batch_size=6, grad_accum=4)
    with pytest.raises(DistilleryError, match="kd_loss"):
        RunConfig(kd_loss="kl")


def test_teacher_and_student_with_different_vocabularies_are_refused(gpt2_setup, tmp_path, capsys):
    other = make_gpt2(tmp_path / "other", gpt2_setup["root"] / "tokenizer", vocab_size=400)
    code = main(["distill", "--teacher", str(gpt2_setup["teacher"]), "--student", str(other),
                 "--data", str(gpt2_setup["data"]), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert code == 2
    assert "vocabulary" in capsys.readouterr().err


def test_data_prepared_with_another_tokenizer_is_refused(gpt2_setup, roberta_setup, tmp_path, capsys):
    code = main(["distill", "--teacher", str(gpt2_setup["teacher"]), "--student", str(gpt2_setup["student"]),
                 "--data", str(roberta_setup["data"]), "--out", str(tmp_path / "run"), "--max-steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and len(err.strip().splitlines()) == 1
