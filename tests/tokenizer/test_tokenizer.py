"""Loading, saving for transformers, decoding, streaming, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from distillery.models.common import DistilleryError
from distillery.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["Hello world", " leading space", "I ❤️ 🐍, 日本語 and 한국어!", "a  b\n\n\tc\r\n", "",
         "say <|endoftext|> then <mask> and <s>", "Hello I'm a <mask> model.", "isn't it , really ?"]


@pytest.fixture(scope="module")
def vocab_dirs(shared_data):
    return {"gpt2": shared_data / "tokenizers" / "gpt2", "roberta": shared_data / "tokenizers" / "roberta"}


@pytest.fixture(scope="module")
def real(vocab_dirs) -> dict[str, Tokenizer]:
    return {style: load_tokenizer(path) for style, path in vocab_dirs.items()}


# -- saving for transformers --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["gpt2", "roberta"])
def test_saved_folder_loads_in_transformers_with_the_same_ids(style, real, tmp_path):
    from transformers import AutoTokenizer

    ours = real[style]
    folder = ours.save_pretrained(tmp_path / style)
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "vocab.json", "merges.txt",
                                                   "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer"}[style]
    assert config["model_max_length"] == {"gpt2": 1024, "roberta": 512}[style]
    assert config["add_prefix_space"] is False
    theirs = AutoTokenizer.from_pretrained(folder)
    assert theirs.model_max_length == ours.model_max_length
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.mask_token_id) == (
        ours.eos_token_id, ours.pad_token_id, ours.mask_token_id)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
    reloaded = load_tokenizer(folder)
    assert reloaded.style == style and reloaded.fingerprint() == ours.fingerprint()


def test_vocab_and_merges_written_equal_the_originals(real, vocab_dirs, tmp_path):
    folder = real["gpt2"].save_pretrained(tmp_path / "gpt2")
    assert json.loads((folder / "vocab.json").read_text()) == json.loads((vocab_dirs["gpt2"] / "vocab.json").read_text())
    assert (folder / "merges.txt").read_text() == (vocab_dirs["gpt2"] / "merges.txt").read_text()


# -- choosing the style -------------------------------------------------------------------------


def _copy_vocab(src, dst):
    dst.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, dst / name)
    return dst


def test_style_comes_from_the_configs_before_the_vocabulary(vocab_dirs, tmp_path):
    assert load_tokenizer(_copy_vocab(vocab_dirs["roberta"], tmp_path / "plain")).style == "roberta"
    by_model = _copy_vocab(vocab_dirs["roberta"], tmp_path / "model-type")
    (by_model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 256}))
    tok = load_tokenizer(by_model)
    assert tok.style == "gpt2" and tok.model_max_length == 256
    by_class = _copy_vocab(vocab_dirs["gpt2"], tmp_path / "class")
    (by_class / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2TokenizerFast", "pad_token": "<|endoftext|>", "model_max_length": 128}))
    tok = load_tokenizer(by_class)
    assert (tok.style, tok.pad_token_id, tok.model_max_length) == ("gpt2", 50256, 128)


def test_model_folder_with_config_json(vocab_dirs, tmp_path):
    folder = _copy_vocab(vocab_dirs["roberta"], tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 66}))
    tok = load_tokenizer(folder)
    assert tok.style == "roberta" and tok.model_max_length == 64  # max_position_embeddings 66 - 2


def test_hub_id_is_read_from_the_cache(vocab_dirs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    _copy_vocab(vocab_dirs["gpt2"], repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_tokenizer("someone/tiny-gpt2").encode("Hello world") == [15496, 995]
    with pytest.raises(DistilleryError, match="not in the Hugging Face cache"):
        load_tokenizer("someone/not-downloaded")


# -- decoding -----------------------------------------------------------------------------------


def test_clean_up_tokenization_spaces_only_when_asked(real):
    ids = real["gpt2"].encode("Hello , world . it is n't so ?")
    assert real["gpt2"].decode(ids) == "Hello , world . it is n't so ?"
    assert real["gpt2"].decode(ids, clean_up_tokenization_spaces=True) == "Hello, world. it isn't so?"


def test_decode_accepts_tensors_and_single_ids(real):
    import torch

    tok = real["roberta"]
    ids = tok.encode("Hello world")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "<s>Hello world</s>"
    assert tok.decode(ids[1]) == "Hello"
    assert tok.batch_decode([ids, ids], skip_special_tokens=True) == ["Hello world"] * 2
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "Hello", "Ġworld", "</s>"]
    assert tok.convert_tokens_to_ids(["Hello", "Ġworld", "no-such-token"]) == [31414, 232, None]


@pytest.mark.parametrize("text", ["😀", "I ❤️ 🐍 and 👩‍👩‍👧‍👦!", "日本語のテキストです。", "中文分词 测试 한국어",
                                  "héllo 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301", "plain ascii <|endoftext|> text"])
@pytest.mark.parametrize("style", ["gpt2", "roberta"])
def test_streaming_never_splits_a_character(text, style, real):
    tok = real[style]
    ids = tok.encode(text)
    for skip in (False, True):
        decoder = tok.incremental_decoder(skip_special_tokens=skip)
        pieces = [decoder.add(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_holds_back_bytes_until_the_character_is_whole(real):
    tok = real["gpt2"]
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    decoder = tok.incremental_decoder()
    assert [decoder.add(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    cut = tok.incremental_decoder()
    assert cut.add(ids[0]) == "" and cut.flush() == "\ufffd" == tok.decode(ids[:1])


def test_streaming_a_long_text_equals_decode(shared_data, real):
    text = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:100_000]
    for tok in real.values():
        ids = tok.encode(text)
        decoder = tok.incremental_decoder()
        assert "".join(decoder.add(i) for i in ids) + decoder.flush() == tok.decode(ids)


# -- calling ------------------------------------------------------------------------------------


def test_call_shapes_and_gpt2_padding_with_eos(real):
    tok = real["gpt2"]
    out = tok(["a b c", "a"], padding=True, padding_side="left")
    assert out["input_ids"].tolist() == [[64, 275, 269], [50256, 50256, 64]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    single = tok("Hello world", return_tensors=None)
    assert single == {"input_ids": [15496, 995], "attention_mask": [1, 1]}
    assert tok("Hello world")["input_ids"].shape == (1, 2)
    long = tok("word " * 2000, truncation=True)
    assert long["input_ids"].shape == (1, 1024)
    # The settings of one call do not leak into the next.
    assert len(tok.encode(" word" * 2000)) == 2000


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(texts=["a", "a b c"]), "padding=True"),
    (dict(texts=[b"bytes"]), "str texts"),
    (dict(texts=["a"], text_pair=["b", "c"]), "one pair per text"),
    (dict(texts=["a"], padding="sideways"), "padding='sideways'"),
    (dict(texts=["a"], padding=True, padding_side="up"), "padding_side='up'"),
    (dict(texts=["a"], truncation="middle"), "truncation='middle'"),
    (dict(texts=["a"], return_tensors="np"), "return_tensors='np'"),
])
def test_call_bad_arguments(kwargs, message, real):
    with pytest.raises(DistilleryError, match=message):
        real["roberta"](**kwargs)


# -- bad folders --------------------------------------------------------------------------------


def test_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(DistilleryError, match="has no tokenizer.json, no vocab.txt and no vocab.json"):
        load_tokenizer(tmp_path)


def test_corrupt_files_are_named(vocab_dirs, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DistilleryError, match="tokenizer.json is not a tokenizer file"):
        load_tokenizer(tmp_path)
    bad = _copy_vocab(vocab_dirs["gpt2"], tmp_path / "bad-merges")
    (bad / "merges.txt").write_text("#version: 0.2\nĠt he llo\n")
    with pytest.raises(DistilleryError, match="do not form a BPE vocabulary"):
        load_tokenizer(bad)
    bad_config = _copy_vocab(vocab_dirs["gpt2"], tmp_path / "bad-config")
    (bad_config / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(DistilleryError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(bad_config)


def test_unsupported_tokenizer_class_and_missing_special_token(vocab_dirs, tmp_path):
    other = _copy_vocab(vocab_dirs["gpt2"], tmp_path / "t5")
    (other / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    with pytest.raises(DistilleryError, match="'T5Tokenizer' is not a tokenizer distillery supports"):
        load_tokenizer(other)
    missing = _copy_vocab(vocab_dirs["gpt2"], tmp_path / "pad")
    (missing / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    with pytest.raises(DistilleryError, match="pad_token '\\[PAD\\]' is not in the tokenizer's vocabulary"):
        load_tokenizer(missing)
