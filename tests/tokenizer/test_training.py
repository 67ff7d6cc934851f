"""Training a byte-level BPE: the files load in distillery and transformers alike; bad input."""

from __future__ import annotations

import json

import pytest

from distillery.cli import main
from distillery.models.common import DistilleryError
from distillery.tokenizer import load_tokenizer, train_tokenizer

CHECK_TEXTS = ["The cat sat on the mat.", "  spaces\n\nand lines\r\n", "émoji 😀 and 日本語", "unseen Zyzzyva!",
               "a <mask> here", "end<|endoftext|>", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small made-up corpus with a BOM, CRLF line ends, non-ASCII text and an invalid byte."""
    words = ("the cat sat on the mat while a dog ran past the old house near the river and "
             "every morning the baker sold bread to the people of the town").split()
    lines = [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    text = "\ufeff" + "\r\n".join(lines) + "\r\nnaïve café 日本語 😀\r\n"
    path.write_bytes(text.encode("utf-8") + b"\xff broken byte\n")
    return path


@pytest.mark.parametrize("style", ["gpt2", "roberta"])
def test_trained_tokenizer_loads_in_distillery_and_transformers(style, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / style
    trained = train_tokenizer([corpus], vocab_size=400, style=style, out_dir=out, show_progress=False)
    # The trainer stops early when the corpus has no more pairs to merge.
    assert 300 < trained.vocab_size <= 400 and trained.style == style
    ours = load_tokenizer(out)
    theirs = AutoTokenizer.from_pretrained(out)
    assert ours.fingerprint() == trained.fingerprint()
    for text in CHECK_TEXTS:
        ids = ours.encode(text)
        assert ids == trained.encode(text) == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids)
        if "<" not in text:
            assert ours.decode(ids, skip_special_tokens=True) == text
    assert len(ours.encode(" the cat sat on the mat", add_special_tokens=False)) < 12  # merges were learned


def test_special_token_ids_of_each_style(corpus, tmp_path):
    gpt2 = train_tokenizer([corpus], 300, "gpt2", tmp_path / "g", show_progress=False)
    assert gpt2.vocab_size == 300
    assert (gpt2.eos_token_id, gpt2.bos_token_id, gpt2.pad_token_id, gpt2.all_special_ids) == (0, 0, None, [0])
    assert gpt2.encode("end<|endoftext|>")[-1] == 0
    roberta = train_tokenizer([corpus], 300, "roberta", tmp_path / "r", show_progress=False)
    assert (roberta.bos_token_id, roberta.pad_token_id, roberta.eos_token_id, roberta.unk_token_id,
            roberta.mask_token_id) == (0, 1, 2, 3, 4)
    ids = roberta.encode("the <mask> sat")
    # <mask> absorbs the space before it: "the" then "<mask>", no space token between them.
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(4) == 1
    assert roberta.decode(ids[1:ids.index(4)]) == "the"
    assert roberta.encode("a") == [0, roberta.convert_tokens_to_ids("a"), 2]


def test_bad_input(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bom_only = tmp_path / "bom.txt"
    bom_only.write_bytes(b"\xef\xbb\xbf")
    cases = [
        (dict(files=[], vocab_size=500, style="gpt2"), "No training files given"),
        (dict(files=[empty], vocab_size=500, style="gpt2"), "are empty"),
        (dict(files=[bom_only], vocab_size=500, style="gpt2"), "hold no text"),
        (dict(files=[tmp_path / "missing.txt"], vocab_size=500, style="gpt2"), "missing.txt does not exist"),
        (dict(files=[tmp_path], vocab_size=500, style="gpt2"), "is a folder"),
        (dict(files=[corpus], vocab_size=100, style="roberta"), "vocab_size 100 is too small.*at least 262"),
        (dict(files=[corpus], vocab_size=500, style="t5"), "style 't5' is not one of gpt2, roberta, bert"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DistilleryError, match=message):
            train_tokenizer(out_dir=tmp_path / "out", show_progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_trains_and_reports_json(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--style", "roberta",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vocab_size"] == 300 and result["style"] == "roberta" and result["files"] == 1
    assert result["fingerprint"] == load_tokenizer(out).fingerprint()


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["tokenizer", "train", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope.txt does not exist" in err
