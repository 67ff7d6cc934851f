"""Speed comparison invariants, the CLI commands end to end, and the model card built from their files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import copy_vocab, save_tiny_gpt2

from distillery.cli import main
from distillery.evaluate import card, speed
from distillery.models import load_model
from distillery.models.common import DistilleryError


def test_greedy_decode_with_cache_equals_recomputing(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    prompt = torch.tensor([[5, 17, 3, 40]])
    got = speed.greedy_decode(model, prompt, 6)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ids[:, 4:])


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, shared_data):
    """A tiny student and a bigger tiny teacher with the real GPT-2 vocabulary and tokenizer files."""
    root = tmp_path_factory.mktemp("pair")
    student = save_tiny_gpt2(root / "student", vocab_size=50257, n_embd=16, n_head=2, n_layer=1)
    teacher = save_tiny_gpt2(root / "teacher", vocab_size=50257, n_embd=16, n_head=2, n_layer=3)
    for d in (student, teacher):
        copy_vocab(shared_data, "gpt2", d)
    return student, teacher


def test_compare_speed_reports_both_and_ratios(gpt2_pair):
    student, teacher = gpt2_pair
    result = speed.compare_speed(str(student), str(teacher), batch_size=2, seq_len=16, new_tokens=4, repeats=1)
    assert result["student"]["parameters"] < result["teacher"]["parameters"]
    assert result["ratios"]["parameters"] == pytest.approx(
        result["student"]["parameters"] / result["teacher"]["parameters"])
    assert result["student"]["decode_tokens_per_s"] > 0 and result["teacher"]["encode_tokens_per_s"] > 0
    assert result["ratios"]["decode_speedup"] > 0


def _run(tmp_path, student, teacher):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    shutil.copytree(student, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": "distill", "teacher": str(teacher), "lr": 5e-4,
                                                     "max_steps": 20, "data": "prepared/books"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "loss": 9.5}, {"step": 20, "loss": 8.25}, {"step": 20, "val_loss": 8.5, "val_ppl": 4914.8}]))
    return run


def test_cli_evaluations_then_card(tmp_path, gpt2_pair, shared_data, capsys):
    student, teacher = gpt2_pair
    run = _run(tmp_path, student, teacher)
    text = tmp_path / "wiki.test.raw"
    text.write_bytes((shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_bytes()[:1500])
    assert main(["eval", "perplexity", str(run / "model"), "--data", str(text), "--max-length", "32",
                 "--stride", "16", "--json", "--save", str(run / "eval" / "perplexity-wikitext2.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["perplexity"] > 1 and printed["tokens"] > 0
    teacher_eval = tmp_path / "teacher-eval"
    assert main(["eval", "perplexity", str(teacher), "--data", str(text), "--max-length", "32", "--stride", "16",
                 "--save", str(teacher_eval / "perplexity-wikitext2.json")]) == 0
    assert main(["eval", "speed", str(run / "model"), str(teacher), "--batch-size", "1", "--seq-len", "8",
                 "--new-tokens", "2", "--repeats", "1", "--save", str(run / "eval" / "speed.json")]) == 0
    out = tmp_path / "card" / "README.md"
    assert main(["card", str(run), "--out", str(out), "--teacher-eval", str(teacher_eval)]) == 0
    text_card = out.read_text()
    want = json.loads((run / "eval" / "perplexity-wikitext2.json").read_text())["perplexity"]
    want_teacher = json.loads((teacher_eval / "perplexity-wikitext2.json").read_text())["perplexity"]
    assert f"| {want:,.2f} | {want_teacher:,.2f} |" in text_card
    assert "![training and validation loss](loss.png)" in text_card and (out.parent / "loss.png").is_file()
    assert (out.parent / "speed.png").is_file()
    assert "GLUE: not measured" in text_card and "Bias probes: not measured" in text_card
    assert "**Carbon emitted:** not measured" in text_card
    assert "| lr | 0.0005 |" in text_card


def test_card_from_a_run_without_metrics(tmp_path, tiny_gpt2_dir, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("kind: distill\n")
    assert main(["card", str(tmp_path / "run"), "--out", str(tmp_path / "README.md")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(DistilleryError, match="is not a folder"):
        card.read_source(tmp_path / "missing")


@pytest.mark.parametrize("config, words", [
    ("kind: [unclosed\n  - : :\n", "config.yaml is not valid YAML (expected ',' or ']', but got ':' at line 2"),
    ("- a list\n", "config.yaml must hold a mapping of setting: value, not a list."),
])
def test_card_of_a_run_with_a_broken_config(tmp_path, tiny_gpt2_dir, capsys, config, words):
    run = _run(tmp_path, tiny_gpt2_dir, "gpt2")
    (run / "config.yaml").write_text(config)
    assert main(["card", str(run), "--out", str(tmp_path / "README.md")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_card_shows_energy_and_glue(tmp_path, tiny_gpt2_dir):
    run = _run(tmp_path, tiny_gpt2_dir, "gpt2")
    (run / "summary.json").write_text(json.dumps({"steps": 20, "parameters": 1234, "energy": {
        "hardware": "AMD EPYC 7763", "parts": [], "hours": 0.5, "kwh": 0.14, "region": "FRA",
        "carbon_intensity_g_per_kwh": 56.0, "carbon_intensity_source": "CodeCarbon", "kg_co2eq": 0.00784}}))
    (run / "eval" / "glue-sst2.json").write_text(json.dumps({"task": "sst2", "card_score": 81.3}))
    info = card.read_source(run)
    text = card.render_card(info, card.read_evals(None), {}, "run/model")
    assert "| student | – | – | – | 81.3 |" in text
    assert "**Carbon emitted:** 0.0078 kg CO2-eq" in text and "1,234 parameters" in text


def test_bad_cli_input_is_one_line(tmp_path, tiny_gpt2_dir, capsys):
    assert main(["glue", "sts", str(tiny_gpt2_dir), "--data", str(tmp_path)]) == 2
    assert "GLUE task 'sts' does not exist" in capsys.readouterr().err
    assert main(["eval", "perplexity", str(tiny_gpt2_dir), "--data", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
