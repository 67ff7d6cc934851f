"""Corpus preparation with the real GPT-2 tokenizer: what lands in the token files, and bad input."""

import json

import numpy as np
import pytest
import torch

from distillery.cli import main
from distillery.distill import data
from distillery.distill.data import (
    TokenDataset,
    check_tokenizer,
    load_meta,
    prepare_corpus,
    token_dtype,
)
from distillery.models.common import DistilleryError

EOS = 50256


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared_data):
    from distillery.tokenizer import load_tokenizer

    return load_tokenizer(shared_data / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 300-id BPE: saving and fingerprinting it is instant, unlike GPT-2's 50k vocabulary."""
    from distillery.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("small-tok")
    (folder / "train.txt").write_text("document number one two three four five six seven eight nine\n" * 20)
    return train_tokenizer([folder / "train.txt"], 300, "gpt2", folder / "tok", show_progress=False)


def documents_of(tokens: np.ndarray, eos: int = EOS) -> list[list[int]]:
    """Split a token file at EOS into the documents it holds."""
    docs, current = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert not current, "every document ends with EOS"
    return docs


@pytest.fixture
def corpus(tmp_path):
    """Awkward inputs: BOM + CRLF, invalid UTF-8, an empty file, a folder, a .jsonl with bad lines."""
    root = tmp_path / "corpus"
    (root / "books" / "sub").mkdir(parents=True)
    (root / "books" / "bom.txt").write_bytes(b"\xef\xbb\xbfThe first line.\r\nThe second line.\r\n")
    (root / "books" / "sub" / "bad.txt").write_bytes(b"caf\xc3\xa9 and \xff\xfe broken bytes\n")
    (root / "books" / "sub" / "empty.txt").write_bytes(b"")
    (root / "books" / "notes.md").write_text("# Notes\n\n    indented code\n")
    (root / "books" / "image.bin").write_bytes(b"\x89PNG\x00\x00binary")
    (root / "books" / ".hidden.txt").write_text("never read")
    lines = [{"text": "A record."}, {"text": "Another\r\nrecord with émoji 🙂."}, {"title": "no text"}, "not an object"]
    (root / "records.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n{broken json\n")
    return root


EXPECTED_TEXTS = {
    "bom": "The first line.\nThe second line.\n",
    "bad": "café and \ufffd\ufffd broken bytes\n",
    "notes": "# Notes\n\n    indented code\n",
    "rec1": "A record.",
    "rec2": "Another\nrecord with émoji 🙂.",
}


def test_prepare_writes_every_document_once_with_eos(corpus, tmp_path, gpt2_tokenizer):
    out = tmp_path / "prepared"
    meta = prepare_corpus([corpus / "books", corpus / "records.jsonl"], gpt2_tokenizer, out,
                          val_docs=1, progress=False)
    counts = meta["counts"]
    assert counts["files"] == 5  # bom, notes, bad, empty + records.jsonl; not the binary or hidden file
    assert counts["documents"] == 5 and counts["train_documents"] + counts["val_documents"] == 5
    assert counts["invalid_utf8_documents"] == 1
    assert counts["skipped_records"] == 3  # no text field, not an object, broken JSON
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["eos_token_id"] == EOS
    assert meta["tokenizer_fingerprint"] == gpt2_tokenizer.fingerprint()

    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) == counts["train_tokens"] and len(val) == counts["val_tokens"]
    got = sorted(documents_of(train) + documents_of(val))
    expected = sorted(gpt2_tokenizer.encode(t) for t in EXPECTED_TEXTS.values())
    assert got == expected
    torch.testing.assert_close(np.load(out / "token_counts.npy"), np.bincount(train, minlength=50257))
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert load_meta(out)["counts"] == counts


def test_large_file_in_pieces_tokenizes_like_the_whole(shared_data, gpt2_tokenizer, tmp_path, monkeypatch):
    text = (shared_data / "text" / "books" / "a-christmas-carol.txt").read_bytes()[:60_000]
    source = tmp_path / "carol.txt"
    source.write_bytes(text)
    monkeypatch.setattr(data, "CHUNK_CHARS", 300)
    pieces = list(data.read_text_file(data.Source("text", source, "carol"), data.ReadStats()))
    assert len(pieces) > 100 and [p.last for p in pieces].count(True) == 1  # it really was cut
    in_pieces = sum(gpt2_tokenizer.encode_batch([p.text for p in pieces]), [])
    whole = data.normalise_newlines(text.decode("utf-8").removeprefix("\ufeff"))
    assert "".join(p.text for p in pieces) == whole
    assert in_pieces == gpt2_tokenizer.encode(whole)


def test_split_is_deterministic_by_document_and_seeded(tmp_path, small_tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(f"document number {i}\n")

    eos = small_tokenizer.eos_token_id

    def val_docs(seed, **kwargs):
        out = tmp_path / f"out-{seed}-{sorted(kwargs.items())}"
        prepare_corpus([docs], small_tokenizer, out, seed=seed, progress=False, overwrite=True, **kwargs)
        return [small_tokenizer.decode(d) for d in documents_of(np.fromfile(out / "val.bin", dtype=np.uint16), eos)]

    first = val_docs(0, val_docs=5)
    assert len(first) == 5 and first == val_docs(0, val_docs=5)
    assert first != val_docs(1, val_docs=5)
    assert len(val_docs(0, val_fraction=0.0005)) == 1  # a positive fraction holds out at least one
    assert len(val_docs(0, val_fraction=0.25)) == 10
    assert set(val_docs(0, val_docs=3)) <= set(first)  # the smallest hashes: fewer is a subset


def test_prepare_refuses_bad_input(tmp_path, corpus, small_tokenizer):
    def prepare(inputs, out="out", **kwargs):
        return prepare_corpus(inputs, small_tokenizer, tmp_path / out, progress=False, **kwargs)

    with pytest.raises(DistilleryError, match="does not exist"):
        prepare([tmp_path / "missing.txt"])
    with pytest.raises(DistilleryError, match=r"no files matching \*\.rst"):
        prepare([corpus / "books"], include=["*.rst"])
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DistilleryError, match="holds no text"):
        prepare([tmp_path / "blank.txt"])
    assert not (tmp_path / "out" / "train.bin").exists()  # nothing half-written is left
    with pytest.raises(DistilleryError, match="--text-field"):
        prepare([corpus / "records.jsonl"], text_field="body")
    with pytest.raises(DistilleryError, match="leaves no training documents"):
        prepare([corpus / "books"], val_docs=3)
    prepare([corpus / "books"], include=["*.md"])
    with pytest.raises(DistilleryError, match="--overwrite"):
        prepare([corpus / "books"])
    assert prepare([corpus / "books"], overwrite=True)["counts"]["documents"] == 3


def test_hub_dataset_name_without_datasets_installed(tmp_path, small_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "_datasets_available", lambda: False)
    with pytest.raises(DistilleryError, match="pip install datasets"):
        prepare_corpus(["wikitext"], small_tokenizer, tmp_path / "out", progress=False)


def test_token_dtype():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.fixture
def prepared(tmp_path, shared_data, small_tokenizer):
    books = shared_data / "text" / "books"
    out = tmp_path / "prepared"
    prepare_corpus([books / "a-christmas-carol.txt", books / "a-study-in-scarlet.txt"], small_tokenizer, out,
                   val_docs=1, progress=False)
    return out


def test_token_dataset_windows(prepared):
    train = TokenDataset(prepared, "train")
    assert len(train) == train.meta["counts"]["train_tokens"]
    tokens = np.asarray(train.tokens)
    batch = train.batch(4, 16, torch.Generator().manual_seed(0))
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    for row in batch.tolist():  # every row is a window of the file
        starts = np.flatnonzero(tokens[:-16] == row[0])
        assert any(tokens[s:s + 17].tolist() == row for s in starts)
    assert torch.equal(batch, train.batch(4, 16, torch.Generator().manual_seed(0)))

    val = TokenDataset(prepared, "val")
    seq = list(val.iter_sequential(batch_size=3, seq_len=50))
    windows = torch.cat(seq)
    n = (len(val) - 1) // 50
    assert windows.shape == (n, 51) and all(b.shape[0] <= 3 for b in seq)
    # Consecutive windows overlap by one token, so each token is a target exactly once.
    assert torch.equal(windows[1:, 0], windows[:-1, -1])
    assert windows[:, :-1].flatten().tolist() == np.asarray(val.tokens[:n * 50]).tolist()
    assert torch.equal(next(val.iter_sequential(2, 50, start=50))[0], windows[1])


def test_token_dataset_errors(prepared, tmp_path):
    with pytest.raises(DistilleryError, match="fewer than one window"):
        TokenDataset(prepared, "val").batch(1, 10**7, torch.Generator())
    with pytest.raises(DistilleryError, match="has no meta.json"):
        TokenDataset(tmp_path)
    with open(prepared / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DistilleryError, match="truncated"):
        TokenDataset(prepared, "val")


def test_check_tokenizer(prepared, small_tokenizer, gpt2_tokenizer):
    meta = load_meta(prepared)
    check_tokenizer(meta, small_tokenizer)
    with pytest.raises(DistilleryError, match="different tokenizer.*re-run distillery prepare"):
        check_tokenizer(meta, gpt2_tokenizer)


def test_cli_prepare(corpus, tmp_path, capsys, shared_data):
    tok = str(shared_data / "tokenizers" / "gpt2")
    out = tmp_path / "cli"
    assert main(["prepare", str(corpus / "books"), "--include", "*.txt", "--tokenizer", tok,
                 "--out", str(out), "--val-docs", "1", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["counts"]["documents"] == 2 and meta["counts"]["invalid_utf8_documents"] == 1
    assert main(["prepare", str(tmp_path / "nope"), "--tokenizer", tok, "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
