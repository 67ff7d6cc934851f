"""Embedding distillation: sentence data, the relation loss, the loop, exact resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_sentence_encoder
from tiny_run import make_data

from distillery.cli import main
from distillery.distill.embedding import attention_relation_loss, epoch_batches, validation_mse
from distillery.distill.sentences import prepare_sentences, read_sentences, split_sentences, strip_gutenberg
from distillery.models.common import DistilleryError
from distillery.models.sentence_encoder import load_sentence_encoder

BOOK = """The Project Gutenberg eBook of Something
*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***

It was a bright cold day in April, and the clocks
were striking thirteen. Mr. Smith went out. "Where?" she asked him quietly.

The hallway smelt of boiled cabbage and old rag mats! At one end of it a coloured
poster had been tacked to the wall.

*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***
Licence text that must not be read.
"""


def test_split_sentences_joins_wrapped_lines_and_keeps_titles():
    assert list(split_sentences(strip_gutenberg(BOOK))) == [
        "It was a bright cold day in April, and the clocks were striking thirteen.",
        "Mr. Smith went out.", '"Where?" she asked him quietly.',
        "The hallway smelt of boiled cabbage and old rag mats!",
        "At one end of it a coloured poster had been tacked to the wall."]


def corpus(tmp_path, n=300):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))).capitalize() + "." for _ in range(n)]
    file = tmp_path / "corpus.txt"
    file.write_text("\n\n".join(lines))
    return file


def test_prepare_sentences_writes_splits_and_refuses_to_overwrite(tmp_path, capsys):
    source = corpus(tmp_path)
    assert main(["prepare", str(source), "--sentences", "--val-sentences", "20", "--out", str(tmp_path / "d")]) == 0
    train, val = read_sentences(tmp_path / "d", "train"), read_sentences(tmp_path / "d", "val")
    assert len(val) == 20 and len(train) > 100 and not set(train) & set(val)
    assert main(["prepare", str(source), "--sentences", "--out", str(tmp_path / "d")]) == 2
    assert "already holds a model, tokenizer, data or run" in capsys.readouterr().err
    with pytest.raises(DistilleryError, match="held out for validation"):
        prepare_sentences([str(source)], tmp_path / "e", val_sentences=10_000)
    # --overwrite with an input that then fails leaves the old data as it was.
    with pytest.raises(DistilleryError, match="held out for validation"):
        prepare_sentences([str(source)], tmp_path / "d", val_sentences=10_000, overwrite=True)
    assert read_sentences(tmp_path / "d", "train") == train
    assert main(["prepare", str(source), "--sentences", "--val-sentences", "30", "--overwrite", "--out",
                 str(tmp_path / "d")]) == 0
    assert len(read_sentences(tmp_path / "d", "val")) == 30


def test_epoch_batches_group_lengths_and_cover_every_sentence():
    lengths = tuple(np.random.default_rng(0).integers(1, 100, 1000).tolist())
    batches = epoch_batches(lengths, 8, 0, 0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert epoch_batches(lengths, 8, 0, 0) == batches and epoch_batches(lengths, 8, 0, 1) != batches
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 20  # random batches of 8 would spread about 75


def test_attention_relation_loss_is_zero_for_equal_states_and_ignores_pads():
    torch.manual_seed(0)
    states = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert float(attention_relation_loss(states, states.clone(), 2, mask)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 12)  # widths may differ: only the T x T relations are compared
    loss = attention_relation_loss(other, states, 2, mask)
    assert loss > 0
    changed = other.clone()
    changed[1, 3:] = 100.0  # padding positions do not count
    assert float(attention_relation_loss(changed, states, 2, mask)) == pytest.approx(float(loss), rel=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    teacher = save_tiny_sentence_encoder(root / "teacher", layers=4)
    assert main(["student", str(teacher), "--layers", "0,2", "--out", str(root / "student")]) == 0
    assert main(["prepare", str(corpus(root)), "--sentences", "--val-sentences", "16", "--out",
                 str(root / "data")]) == 0
    return root


def distill_args(root, out, steps, *extra):
    return ["distill", "--objective", "embedding", "--teacher", str(root / "teacher"), "--student",
            str(root / "student"), "--data", str(root / "data"), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3", "--warmup-steps", "0", "--eval-every", "3",
            "--eval-batches", "2", "--save-every", "2", "--log-every", "1", "--no-plot", *extra]


def test_student_keeps_the_teachers_pooling(pair):
    teacher, student = load_sentence_encoder(pair / "teacher"), load_sentence_encoder(pair / "student")
    assert student.pooling == teacher.pooling and student.normalize == teacher.normalize
    assert student.model.config.num_layers == 2 and student.max_seq_length == teacher.max_seq_length


def test_distillation_brings_the_student_closer_and_saves_a_sentence_encoder(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(pair, out, 6, "--alpha-cos", "0.5", "--alpha-attn", "1", "--relation-heads", "4",
                             "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"emb", "cos", "attn"} <= set(records[0])
    assert summary["objective"] == "embedding" and summary["energy"]["kwh"] > 0
    trained = load_sentence_encoder(out / "model")
    assert trained.encode(["Alpha beta gamma."]).shape == (1, 32)
    assert trained.max_seq_length == load_sentence_encoder(pair / "student").max_seq_length  # not --seq-len

    assert main(distill_args(pair, tmp_path / "mse-only", 8, "--alpha-cos", "0", "--lr", "1e-4")) == 0
    teacher, untrained = load_sentence_encoder(pair / "teacher"), load_sentence_encoder(pair / "student")
    val = read_sentences(pair / "data", "val")
    before = validation_mse(teacher, untrained, val, 8)
    after = validation_mse(teacher, load_sentence_encoder(tmp_path / "mse-only" / "model"), val, 8)
    assert after < before


def test_resume_after_a_crash_equals_an_uninterrupted_run(pair, tmp_path, monkeypatch):
    from distillery.distill import embedding

    assert main(distill_args(pair, tmp_path / "straight", 4)) == 0
    real_draw, calls = embedding.draw, []

    def crash_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(embedding, "draw", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(distill_args(pair, tmp_path / "crashed", 4))
    monkeypatch.setattr(embedding, "draw", real_draw)
    assert main(distill_args(pair, tmp_path / "crashed", 4, "--resume")) == 0
    a = load_sentence_encoder(tmp_path / "straight" / "model").model.state_dict()
    b = load_sentence_encoder(tmp_path / "crashed" / "model").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_nonfinite_validation_loss_stops_before_saving(pair, tmp_path, monkeypatch, capsys):
    from distillery.distill import embedding

    monkeypatch.setattr(embedding, "validation_mse", lambda *args, **kwargs: float("nan"))
    out = tmp_path / "run"
    assert main(distill_args(pair, out, 4)) == 2  # a checkpoint at step 2, the evaluation at step 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "The validation loss became nan at step 3" in last and "keeps the last good step" in last
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and not (out / "model").exists()


def test_weights_broken_by_the_last_step_are_not_saved(pair, tmp_path, monkeypatch, capsys):
    from distillery.distill import trainer

    make_optimizer = trainer.make_optimizer

    def breaking_optimizer(model, config):
        optimizer = make_optimizer(model, config)
        steps = []

        def after_step(*args):
            steps.append(1)
            if len(steps) == 4:  # the last step of 4 breaks the weights
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

        optimizer.register_step_post_hook(after_step)
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", breaking_optimizer)
    out = tmp_path / "run"
    assert main(distill_args(pair, out, 4)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "The weights became NaN or infinite by step 4" in last and "keeps the last good step" in last
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and not (out / "model").exists()


def test_an_error_in_the_final_evaluation_keeps_the_final_model(pair, tmp_path, monkeypatch):
    from distillery.distill import embedding

    calls = []

    def broken_at_the_end(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluations at steps 3 and 4
            raise RuntimeError("evaluation broke")
        return 0.5

    monkeypatch.setattr(embedding, "validation_mse", broken_at_the_end)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation broke"):
        main(distill_args(pair, out, 4))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert (out / "model" / "modules.json").is_file()
    monkeypatch.undo()
    assert main(distill_args(pair, out, 4, "--resume")) == 0  # only the final evaluation is left
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 4]


def test_refusals(pair, tmp_path, tiny_gpt2_dir, capsys):
    args = distill_args(pair, tmp_path / "r", 2)
    causal = [str(tiny_gpt2_dir) if a == str(pair / "student") else a for a in args]
    assert main(causal) == 2
    assert "causal LM" in capsys.readouterr().err
    swapped = [str(pair / "student") if a == str(pair / "teacher") else str(pair / "teacher")
               if a == str(pair / "student") else a for a in args]
    assert main(swapped) == 2
    assert "smaller than its teacher" in capsys.readouterr().err
    no_data = [str(tmp_path) if a == str(pair / "data") else a for a in args]
    assert main(no_data) == 2
    assert "holds no sentence data" in capsys.readouterr().err
    token_data = [str(make_data(tmp_path / "tokens")) if a == str(pair / "data") else a for a in args]
    assert main(token_data) == 2
    assert "holds token data for the language-model objectives" in capsys.readouterr().err


def test_card_of_an_embedding_student(pair, tmp_path, capsys):
    from sts_files import write_glue_sts

    run = tmp_path / "run"
    assert main(distill_args(pair, run, 2)) == 0
    data = write_glue_sts(tmp_path / "dev.tsv")
    assert main(["eval", "sts", str(run / "model"), "--teacher", str(pair / "teacher"), "--data", str(data),
                 "--repeats", "1", "--save", str(run / "eval" / "sts-dev.json")]) == 0
    assert main(["eval", "sts", str(pair / "student"), "--data", str(data), "--save",
                 str(run / "eval" / "before" / "sts-dev.json")]) == 0
    assert main(["card", str(run), "--out", str(run / "README.md")]) == 0
    card = (run / "README.md").read_text()
    assert "sentence embedding model" in card and "STS benchmark" in card
    assert "| dev.tsv (5 pairs) |" in card and "not measured" not in card.split("### Semantic")[1].split("##")[0]
    assert "x as many sentences per second as its teacher" in card
    assert "SentenceTransformer(" in card and "Sentences seen" in card


def test_eval_sts_goes_with_the_embedding_objective_only():
    from distillery.distill.run_config import RunConfig

    assert RunConfig(objective="embedding", eval_sts="dev.tsv", alpha_ce=0, alpha_lm=0).eval_sts == "dev.tsv"
    with pytest.raises(DistilleryError, match="goes with --objective embedding"):
        RunConfig(eval_sts="dev.tsv")
    with pytest.raises(DistilleryError, match="needs --teacher"):
        RunConfig(objective="embedding", teacher_cache="cache/")
