"""Nothing a user made is overwritten by surprise or lost when a command fails.

OutputFolder itself first (refusals, write-beside-and-swap, a failure leaving the old folder),
then each writing command against the data-loss cases of issue 11.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import save_tiny_gpt2

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


@pytest.fixture
def gpt2_with_tokenizer(tmp_path) -> Path:
    """A tiny GPT-2 with a 300-id byte-level tokenizer of its own (trained here, offline)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 50)
    model = save_tiny_gpt2(tmp_path / "gpt2", vocab_size=300, bos_token_id=0, eos_token_id=0)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    for p in (tmp_path / "tok").iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    return model
