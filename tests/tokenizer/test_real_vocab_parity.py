"""Ids equal transformers' fast tokenizers and tiktoken on the real GPT-2 and RoBERTa vocabularies."""

from __future__ import annotations

import json

import pytest

from distillery.tokenizer import load_tokenizer
from distillery.tokenizer.streaming import byte_level_alphabet

HARD_CASES = [
    "", " ", "   leading spaces", "trailing spaces   ", "a  b   c    d     e", "\n", "\n\n\n\n",
    "line one\r\nline two\r\n", "\t tab\tand\ttabs", "😀", "I ❤️ 🐍 and 👩‍👩‍👧‍👦!", "日本語のテキストです。",
    "中文分词测试", "한국어 문장", "héllo wörld, naïve café", "e\u0301 combining", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "<|endoftext|>", "hello<|endoftext|>world", " <|endoftext|> \n<|endoftext|><|endoftext|>",
    "I'm sure you'll see they've DON'T", "1234567890 3.14159 1,000,000", "\ufeffwith a BOM",
    "zero\u200bwidth", "nul\x00byte", "    \n    indented\n\tcode()", "<s>Hello</s>", "<pad><unk>",
]
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="module")
def vocab_dirs(shared_data):
    return shared_data / "tokenizers" / "gpt2", shared_data / "tokenizers" / "roberta"


@pytest.fixture(scope="module")
def gpt2(vocab_dirs):
    return load_tokenizer(vocab_dirs[0])


@pytest.fixture(scope="module")
def roberta(vocab_dirs):
    return load_tokenizer(vocab_dirs[1])


@pytest.fixture(scope="module")
def hf_gpt2(vocab_dirs):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(vocab_dirs[0])


@pytest.fixture(scope="module")
def hf_roberta(vocab_dirs):
    from transformers import AddedToken, RobertaTokenizerFast

    # vocab.json + merges.txt do not say that <mask> absorbs the space before it; the real
    # roberta-base tokenizer.json does, so the reference is built with that one flag.
    mask = AddedToken("<mask>", lstrip=True, rstrip=False, special=True, normalized=False)
    return RobertaTokenizerFast.from_pretrained(vocab_dirs[1], mask_token=mask)


@pytest.fixture(scope="module")
def tiktoken_gpt2(vocab_dirs):
    tiktoken = pytest.importorskip("tiktoken")
    vocab = json.loads((vocab_dirs[0] / "vocab.json").read_text(encoding="utf-8"))
    alphabet = byte_level_alphabet()
    ranks = {bytes(alphabet[c] for c in token): i for token, i in vocab.items() if token != "<|endoftext|>"}
    # Built from the local files: tiktoken.get_encoding("gpt2") would download them.
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def corpus(shared_data) -> dict[str, str]:
    books = shared_data / "text" / "books"
    files = {"wikitext-2 test": shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw",
             "jekyll (BOM, CRLF)": books / "dr-jekyll-and-mr-hyde.txt",
             "alice (BOM, CRLF)": books / "alices-adventures-in-wonderland.txt"}
    # newline="" keeps the CRLF line ends, and utf-8 (not utf-8-sig) keeps the BOM as text.
    return {name: path.open(encoding="utf-8", newline="").read() for name, path in files.items()}


def test_worked_examples(gpt2, roberta):
    assert roberta.encode("Hello I'm a <mask> model.") == [0, 31414, 38, 437, 10, 50264, 1421, 4, 2]
    assert roberta.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False) == [
        133, 2119, 6219, 23602, 13855, 81, 5, 22414, 2335]
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello world") == [18435, 995]


def test_special_token_ids(gpt2, roberta):
    assert (gpt2.style, gpt2.vocab_size, gpt2.bos_token_id, gpt2.eos_token_id) == ("gpt2", 50257, 50256, 50256)
    assert gpt2.pad_token_id is None and gpt2.mask_token_id is None and gpt2.all_special_ids == [50256]
    assert roberta.style == "roberta" and roberta.vocab_size == 50265
    assert (roberta.bos_token_id, roberta.pad_token_id, roberta.eos_token_id, roberta.unk_token_id,
            roberta.mask_token_id, roberta.mask_token) == (0, 1, 2, 3, 50264, "<mask>")
    assert roberta.all_special_ids == [0, 1, 2, 3, 50264]


def test_endoftext_inside_text_is_the_special_token_for_gpt2(gpt2, hf_gpt2):
    assert gpt2.encode("hello<|endoftext|> world") == [31373, 50256, 995] == hf_gpt2.encode("hello<|endoftext|> world")


@pytest.mark.parametrize("text", HARD_CASES, ids=repr)
def test_hard_cases_match_transformers_and_tiktoken(text, gpt2, roberta, hf_gpt2, hf_roberta, tiktoken_gpt2):
    assert gpt2.encode(text) == hf_gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all")
    assert roberta.encode(text) == hf_roberta.encode(text)
    assert roberta.encode(text, add_special_tokens=False) == hf_roberta.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", ["Hello I'm a <mask> model.", "a<mask>b", "a    <mask>", "<mask> first",
                                  "two <mask> <mask> masks", "tail <mask>"])
def test_mask_absorbs_the_space_before_it(text, roberta, hf_roberta):
    assert roberta.encode(text) == hf_roberta.encode(text)
    assert roberta.encode(text).count(50264) == text.count("<mask>")


def test_whole_files_match_transformers_and_tiktoken(corpus, gpt2, roberta, hf_gpt2, hf_roberta, tiktoken_gpt2):
    for name, text in corpus.items():
        ids = gpt2.encode(text)
        assert ids == hf_gpt2.encode(text), name
        assert ids == tiktoken_gpt2.encode(text, allowed_special="all"), name
        assert gpt2.decode(ids) == text, name
        assert roberta.encode(text) == hf_roberta.encode(text), name


def test_batches_of_lines_match_transformers(corpus, gpt2, roberta, hf_gpt2, hf_roberta):
    lines = corpus["wikitext-2 test"].splitlines(keepends=True)[:1500]
    assert gpt2.encode_batch(lines) == hf_gpt2(lines)["input_ids"]
    assert roberta.encode_batch(lines) == hf_roberta(lines)["input_ids"]


def test_decode_matches_transformers(corpus, gpt2, roberta, hf_gpt2, hf_roberta):
    for text in [*HARD_CASES, corpus["jekyll (BOM, CRLF)"][:20000]]:
        for tok, hf in ((gpt2, hf_gpt2), (roberta, hf_roberta)):
            ids = tok.encode(text)
            for skip in (False, True):
                assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_roberta_decode_round_trips_without_specials(roberta):
    for text in HARD_CASES:
        if "<" not in text:
            assert roberta.decode(roberta.encode(text), skip_special_tokens=True) == text


def test_batch_padding_and_truncation_match_transformers(roberta, hf_roberta):
    texts = ["short", "a somewhat longer sentence with more tokens in it", "mid length text"]
    for side in ("right", "left"):
        ours = roberta(texts, padding=True, padding_side=side)
        hf_roberta.padding_side = side
        theirs = hf_roberta(texts, padding=True, return_tensors="pt")
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
        assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    hf_roberta.padding_side = "right"
    ours = roberta(texts, truncation=True, max_length=6, padding="max_length", return_tensors=None)
    assert ours == {k: v for k, v in hf_roberta(texts, truncation=True, max_length=6, padding="max_length").items()
                    if k in ours}
    assert all(ids[-1] == 2 or ids[-1] == 1 for ids in ours["input_ids"])


def test_sentence_pairs_match_transformers(roberta, hf_roberta):
    first = ["a question about the weather today", "short"]
    second = ["short", "a long passage that will need to be cut to fit the limit we set below"]
    assert roberta(first, second, return_tensors=None)["input_ids"] == hf_roberta(first, second)["input_ids"]
    ours = roberta(first, second, truncation=True, max_length=12, return_tensors=None)["input_ids"]
    assert ours == hf_roberta(first, second, truncation=True, max_length=12)["input_ids"]
    assert [len(ids) for ids in ours] == [11, 12] and all(ids.count(2) == 3 for ids in ours)


def test_fingerprint_is_stable_and_tells_vocabularies_apart(gpt2, roberta, vocab_dirs, tmp_path):
    # Pinned: data shards and checkpoints record this hash, so it must not drift between releases.
    assert gpt2.fingerprint() == "0d3d5ee527e269249c96f9289ef91830cba151d3fc84012f140522a8514bf47f"
    assert gpt2.fingerprint() != roberta.fingerprint()
    assert load_tokenizer(gpt2.save_pretrained(tmp_path / "gpt2")).fingerprint() == gpt2.fingerprint()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "vocab.json").write_text((vocab_dirs[0] / "vocab.json").read_text(encoding="utf-8"), encoding="utf-8")
    merges = (vocab_dirs[0] / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (cut / "merges.txt").write_text("".join(merges[:-1]), encoding="utf-8")
    assert load_tokenizer(cut).fingerprint() != gpt2.fingerprint()
