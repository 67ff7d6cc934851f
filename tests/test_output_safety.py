"""Nothing a user made is overwritten by surprise or lost when a command fails.

OutputFolder itself first (refusals, write-beside-and-swap, a failure leaving the old folder),
then each writing command against the data-loss cases of issue 11.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from distillery.cli import json_safe, main
from distillery.cli_types import OutputFolder
from distillery.models.common import DistilleryError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path) -> list[str]:
    """Names beside `folder` (a staging or old copy left behind would show here)."""
    return sorted(p.name for p in folder.parent.iterdir())


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# OutputFolder


def test_new_folder_appears_only_at_the_end(tmp_path):
    target = OutputFolder(tmp_path / "new")
    with target.staged() as folder:
        (folder / "config.json").write_text("{}")
        assert not (tmp_path / "new").exists()
    assert (tmp_path / "new" / "config.json").read_text() == "{}"
    assert siblings(tmp_path / "new") == ["new"]


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    with OutputFolder(tmp_path / "empty").staged() as folder:
        (folder / "a.json").write_text("1")
    assert (tmp_path / "empty" / "a.json").is_file()


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(DistilleryError, match="already holds a model.*--overwrite"):
        OutputFolder(tmp_path / "model")
    with OutputFolder(tmp_path / "model", overwrite=True).staged() as folder:
        (folder / "model.safetensors").write_text("new")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.safetensors"]
    assert siblings(tmp_path / "model") == ["model"]


def test_failure_and_interrupt_leave_the_old_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("old")
    before = snapshot(tmp_path / "model")
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), OutputFolder(tmp_path / "model", overwrite=True).staged() as folder:
            (folder / "config.json").write_text("half")
            raise error
        assert snapshot(tmp_path / "model") == before
        assert siblings(tmp_path / "model") == ["model"]


@pytest.mark.parametrize("case", ["file", "unrelated", "input", "around-input", "home", "cwd"])
def test_refusals(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "inputs" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    paths = {"file": tmp_path / "f.txt", "unrelated": tmp_path / "docs", "input": model,
             "around-input": tmp_path / "inputs", "home": Path("~"), "cwd": Path(".")}
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    messages = {"file": "is a file", "unrelated": "not empty", "input": "is the input",
                "around-input": "holds the input", "home": "home folder", "cwd": "working folder"}
    with pytest.raises(DistilleryError, match=messages[case]):
        OutputFolder(paths[case], overwrite=True, inputs=[model])


def test_json_safe_is_strict():
    value = {"ppl": float("nan"), "xs": [1.5, float("inf")], "ok": 2.0}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"ppl": None, "ppl_reason": "not a finite number (nan)", "xs": [1.5, None],
                                "ok": 2.0}


# ------------------------------------------------------------------------------------------------
# Commands


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The parser walk's tiny models and data (built once for this module)."""
    from test_cli_walk import build_fixtures

    return {k: Path(v) for k, v in build_fixtures(tmp_path_factory.mktemp("safety")).items()}


@pytest.fixture
def prepared(inputs, tmp_path, capsys) -> Path:
    """A good data folder of this test's own."""
    out = tmp_path / "data"
    assert run(capsys, "prepare", inputs["text"], "--tokenizer", inputs["gpt2"], "--out", out)[0] == 0
    return out


def assert_refused(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and all(f in last for f in fragments), last


@pytest.mark.parametrize("failure", ["empty folder", "wrong text field", "interrupted"])
def test_prepare_overwrite_that_fails_keeps_the_old_data(inputs, prepared, tmp_path, capsys, monkeypatch, failure):
    before = snapshot(prepared)
    given = tmp_path / "given"
    if failure == "empty folder":
        (given / "empty").mkdir(parents=True)
        argv = [given / "empty"]
    elif failure == "wrong text field":
        given.mkdir()
        (given / "records.jsonl").write_text('{"body": "some text"}\n{"body": "more text"}\n')
        argv = [given / "records.jsonl", "--text-field", "text"]
    else:
        from distillery.tokenizer.tokenizer import Tokenizer

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(Tokenizer, "encode_batch", interrupt)
        argv = [inputs["text"]]
    code, _, err = run(capsys, "prepare", *argv, "--tokenizer", inputs["gpt2"], "--out", prepared, "--overwrite")
    assert code == (130 if failure == "interrupted" else 2)
    assert snapshot(prepared) == before and set(siblings(prepared)) <= {"data", "given"}  # no staging left


def test_prepare_over_existing_data_needs_overwrite(inputs, prepared, capsys):
    before = snapshot(prepared)
    code, _, err = run(capsys, "prepare", inputs["text"], "--tokenizer", inputs["gpt2"], "--out", prepared)
    assert_refused(code, err, "already holds", "--overwrite")
    assert snapshot(prepared) == before
    assert run(capsys, "prepare", inputs["text"], "--tokenizer", inputs["gpt2"], "--out", prepared,
               "--overwrite")[0] == 0


def test_student_over_an_existing_model(inputs, tmp_path, capsys):
    out = tmp_path / "student"
    assert run(capsys, "student", inputs["gpt2"], "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = run(capsys, "student", inputs["gpt2"], "--out", out, "--layers", "0")
    assert_refused(code, err, "already holds", "--overwrite")
    assert snapshot(out) == before
    assert run(capsys, "student", inputs["gpt2"], "--out", out, "--layers", "0", "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["n_layer"] == 1 and siblings(out) == ["student"]
    code, _, err = run(capsys, "student", inputs["gpt2"], "--out", inputs["gpt2"], "--overwrite")
    assert_refused(code, err, "teacher's folder")


def test_tokenizer_train_never_replaces_a_models_vocabulary(inputs, capsys):
    before = snapshot(inputs["gpt2"])
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, "tokenizer", "train", inputs["text"], "--vocab-size", 280, "--out",
                           inputs["gpt2"], *extra)
        assert_refused(code, err, "holds a model")
    assert snapshot(inputs["gpt2"]) == before


def test_tokenizer_train_over_a_tokenizer(inputs, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run(capsys, "tokenizer", "train", inputs["text"], "--vocab-size", 280, "--out", out)[0] == 0
    before = snapshot(out)
    code, _, err = run(capsys, "tokenizer", "train", inputs["text"], "--vocab-size", 290, "--out", out)
    assert_refused(code, err, "--overwrite")
    assert snapshot(out) == before
    (inputs["folder"] / "empty.txt").write_text("")
    try:  # a training that fails leaves the old tokenizer
        code, _, err = run(capsys, "tokenizer", "train", inputs["folder"] / "empty.txt", "--vocab-size", 290,
                           "--out", out, "--overwrite")
    finally:
        (inputs["folder"] / "empty.txt").unlink()
    assert code == 2 and snapshot(out) == before


@pytest.mark.parametrize("command", ["glue", "finetune"])
def test_output_folder_equal_to_the_input_model(inputs, capsys, command):
    model = inputs["roberta"] if command == "glue" else inputs["gpt2"]
    before = snapshot(model)
    argv = {"glue": ["glue", "sst2", model, "--data", inputs["glue"], "--epochs", 1, "--max-length", 16],
            "finetune": ["finetune", model, "--train", inputs["text"], "--max-steps", 1, "--block-size", 8]}[command]
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, *argv, "--out", model, *extra)
        assert_refused(code, err, "is the input")
    assert snapshot(model) == before


def test_glue_output_dir_alias_and_refusal(inputs, tmp_path, capsys):
    out = tmp_path / "glue-model"
    argv = ["glue", "sst2", inputs["roberta"], "--data", inputs["glue"], "--epochs", 1, "--max-length", 16,
            "--batch-size", 4]
    assert run(capsys, *argv, "--output-dir", out)[0] == 0
    assert (out / "config.json").is_file()
    before = snapshot(out)
    code, _, err = run(capsys, *argv, "--out", out)
    assert_refused(code, err, "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize("text, words", [(" ", "too few for a perplexity"),
                                         ("hi", "shorter than one window of 8; use a longer file or pass --block-size")])
def test_finetune_checks_its_eval_text_before_training(inputs, tmp_path, capsys, text, words):
    (tmp_path / "short.txt").write_text(text)
    out = tmp_path / "ft"
    code, _, err = run(capsys, "finetune", inputs["gpt2"], "--train", inputs["text"], "--eval", tmp_path / "short.txt",
                       "--out", out, "--max-steps", 1, "--block-size", 8)
    assert_refused(code, err, "--eval", words)
    assert "loss=" not in err and "--max-length" not in err  # refused before training, naming its own option
    assert not out.exists()


def test_finetune_over_its_own_output(inputs, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", inputs["gpt2"], "--train", inputs["text"], "--out", out, "--max-steps", 1, "--block-size", 8,
            "--batch-size", 2]
    assert run(capsys, *argv)[0] == 0
    before = snapshot(out)
    code, _, err = run(capsys, *argv)
    assert_refused(code, err, "--overwrite")
    assert snapshot(out) == before
    code, out_text, _ = run(capsys, *argv, "--overwrite", "--json")
    assert code == 0 and json.loads(out_text)["steps"] == 1 and siblings(out) == ["ft"]


def test_save_and_card_never_replace_a_file_that_is_not_theirs(inputs, capsys):
    before = snapshot(inputs["file"].parent)
    code, _, err = run(capsys, "eval", "perplexity", inputs["gpt2"], "--data", inputs["text"], "--save", inputs["file"])
    assert_refused(code, err, "not a saved JSON result")
    code, _, err = run(capsys, "card", inputs["gpt2"], "--out", inputs["file"])
    assert_refused(code, err, "not a .md file")
    assert snapshot(inputs["file"].parent) == before


def test_nonfinite_loss_stops_finetuning(inputs, tmp_path, capsys, monkeypatch):
    from distillery.evaluate import finetune

    real = finetune.F.cross_entropy
    monkeypatch.setattr(finetune.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    code, _, err = run(capsys, "finetune", inputs["gpt2"], "--train", inputs["text"], "--out", tmp_path / "ft",
                       "--max-steps", 5, "--block-size", 8)
    assert_refused(code, err, "The training loss became nan at step 1", "lower --lr")
    assert not (tmp_path / "ft").exists()


def test_learning_rates_above_one_are_refused(inputs, tmp_path, capsys):
    for command in (["train"], ["finetune", inputs["gpt2"], "--train", inputs["text"], "--out", tmp_path / "o"]):
        code, _, err = run(capsys, *command, "--lr", "1e6")
        assert_refused(code, err, "--lr", "from 0 to 1")


def test_train_resume_without_a_run(inputs, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--out", tmp_path / "nothing-here", "--resume")
    assert_refused(code, err, "no run to resume")


def test_diverging_training_stops_before_saving_broken_weights(inputs, tmp_path, capsys, monkeypatch):
    from distillery.distill import trainer

    real = trainer.batch_loss

    def diverging(*args, **kwargs):  # finite for two steps, then NaN
        loss, terms = real(*args, **kwargs)
        diverging.calls += 1
        return (loss * float("nan") if diverging.calls > 2 else loss), terms

    diverging.calls = 0
    monkeypatch.setattr(trainer, "batch_loss", diverging)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", inputs["gpt2"], "--data", inputs["data"], "--out", out,
                       "--max-steps", 4, "--batch-size", 2, "--seq-len", 8, "--warmup-steps", 0, "--eval-every", 2,
                       "--save-every", 2, "--no-plot", "--device", "cpu")
    assert_refused(code, err, "The training loss became nan at step 3", "keeps the last good step", "lower --lr")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and not (out / "model").exists()


def test_layer_map_without_mapped_cosine_is_refused(inputs, tmp_path, capsys):
    code, _, err = run(capsys, "distill", "--teacher", inputs["gpt2"], "--student", inputs["student"], "--data",
                       inputs["data"], "--out", tmp_path / "run", "--layer-map", "0")
    assert_refused(code, err, "--cos-layers mapped")


def test_validation_split_too_small_fails_before_the_first_step(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", inputs["gpt2"], "--data", inputs["data"], "--out", out,
                       "--max-steps", 1, "--batch-size", 2, "--seq-len", 5000, "--device", "cpu")
    assert_refused(code, err, "fewer than one window")
    assert not out.exists()


def test_encoder_preset_on_a_gpt2_tokenizer(inputs, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--model", "roberta-base", "--n-layer", 1, "--n-embd", 16, "--n-head", 2,
                       "--data", inputs["data"], "--tokenizer", inputs["gpt2"], "--out", tmp_path / "run",
                       "--max-steps", 1, "--batch-size", 2, "--seq-len", 8, "--device", "cpu")
    assert_refused(code, err, "roberta-base preset needs special tokens")
