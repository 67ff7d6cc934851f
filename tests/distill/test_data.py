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


# ----------------------------------------------------------------------------------------------
# Parquet, Arrow and folders saved by Hugging Face datasets (written here with pyarrow alone)

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the `data` extra
    pa = pq = None
needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed")


def save_like_datasets(folder, texts: list, files: int = 2, **columns) -> None:
    """The layout of datasets' Dataset.save_to_disk: Arrow stream files listed in state.json, beside
    dataset_info.json (what datasets writes, without needing the package)."""
    folder.mkdir(parents=True)
    table = pa.table({"text": pa.array(texts, pa.string()), **columns})
    step = -(-len(texts) // files)
    names = [f"data-{i:05d}-of-{files:05d}.arrow" for i in range(files)]
    for i, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(i * step, step), max_chunksize=2)  # several batches per file
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "0", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    info = {"citation": "", "description": "", "features": {"text": {"dtype": "string", "_type": "Value"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def all_documents(out, tokenizer) -> list[str]:
    eos = tokenizer.eos_token_id
    tokens = [np.fromfile(out / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")]
    return sorted(tokenizer.decode(d) for split in tokens for d in documents_of(split, eos))


@needs_pyarrow
def test_parquet_file_streams_its_text_column(tmp_path, small_tokenizer, monkeypatch):
    texts = [f"record {i}\r\nline two" for i in range(10)] + [None]
    table = pa.table({"id": list(range(11)), "body": texts})
    pq.write_table(table, tmp_path / "corpus.parquet", row_group_size=3)
    monkeypatch.setattr(data, "TABLE_BATCH_ROWS", 2)  # several batches, never the whole table
    meta = prepare_corpus([tmp_path / "corpus.parquet"], small_tokenizer, tmp_path / "out", text_field="body",
                          val_docs=2, progress=False)
    counts = meta["counts"]
    assert counts["documents"] == 10 and counts["val_documents"] == 2 and counts["skipped_records"] == 1
    assert counts["bytes"] == (tmp_path / "corpus.parquet").stat().st_size
    assert all_documents(tmp_path / "out", small_tokenizer) == sorted(t.replace("\r\n", "\n") for t in texts[:10])


@needs_pyarrow
def test_save_to_disk_folders_and_mixed_folders(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"
    save_like_datasets(corpus / "wiki", ["wiki one", "wiki two", "", None, "wiki three"], label=[1, 2, 3, 4, 5])
    # A DatasetDict: dataset_dict.json and one folder per split; only train is read.
    (corpus / "dict").mkdir()
    (corpus / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    save_like_datasets(corpus / "dict" / "train", ["dict train"], files=1)
    save_like_datasets(corpus / "dict" / "test", ["dict test, never read"], files=1)
    pq.write_table(pa.table({"text": ["from parquet"]}), corpus / "table.parquet")
    (corpus / "notes.txt").write_text("from text\n")
    (corpus / "lines.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")

    meta = prepare_corpus([corpus], small_tokenizer, tmp_path / "out", val_docs=1, progress=False)
    assert meta["counts"]["files"] == 5  # dict, lines.jsonl, notes.txt, table.parquet, wiki
    assert meta["counts"]["skipped_records"] == 1  # the null; the empty string is a document of no tokens
    assert all_documents(tmp_path / "out", small_tokenizer) == sorted(
        ["wiki one", "wiki two", "wiki three", "dict train", "from parquet", "from text\n", "from jsonl"])

    # The folder itself, and --include picking a datasets folder by name.
    meta = prepare_corpus([corpus / "wiki"], small_tokenizer, tmp_path / "wiki", val_docs=1, progress=False)
    assert meta["counts"]["documents"] == 3
    meta = prepare_corpus([corpus], small_tokenizer, tmp_path / "inc", include=["dict", "*.txt"], val_docs=1,
                          progress=False)
    assert all_documents(tmp_path / "inc", small_tokenizer) == ["dict train", "from text\n"]


@needs_pyarrow
def test_tables_refuse_bad_input_in_one_sentence(tmp_path, small_tokenizer, monkeypatch, capsys, shared_data):
    def prepare(inputs, **kwargs):
        return prepare_corpus(inputs, small_tokenizer, tmp_path / "out", progress=False, **kwargs)

    pq.write_table(pa.table({"title": ["a"], "body": ["b"]}), tmp_path / "fields.parquet")
    with pytest.raises(DistilleryError, match=r"has no column 'text' \(it has title, body\); pass --text-field"):
        prepare([tmp_path / "fields.parquet"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(DistilleryError, match="holds int64, not text"):
        prepare([tmp_path / "numbers.parquet"])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DistilleryError, match="not a readable parquet file"):
        prepare([tmp_path / "broken.parquet"])
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(DistilleryError, match="has no train split"):
        prepare([tmp_path / "dict"])
    save_like_datasets(tmp_path / "saved", ["x", "y"])
    (tmp_path / "saved" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DistilleryError, match="lacks data-00001-of-00002.arrow"):
        prepare([tmp_path / "saved"])
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(DistilleryError, match="pip install pyarrow"):
        prepare([tmp_path / "fields.parquet"], text_field="body")
    monkeypatch.undo()

    code = main(["prepare", str(tmp_path / "fields.parquet"), "--tokenizer", str(shared_data / "tokenizers" / "gpt2"),
                 "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert code == 2 and "--text-field" in err and "Traceback" not in err and err.count("\n") == 1


def test_one_document_holds_out_its_tail_at_a_line(shared_data, gpt2_tokenizer, tmp_path):
    source = shared_data / "text" / "tinyshakespeare" / "input.txt"
    meta = prepare_corpus([source], gpt2_tokenizer, tmp_path / "out", progress=False)
    counts = meta["counts"]
    assert meta["val_split"] == "tail" and meta["val_tail_of"] == "input.txt"
    assert counts["documents"] == counts["train_documents"] == 1
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert len(train) == counts["train_tokens"] and len(val) == counts["val_tokens"]
    assert train[-1] == val[-1] == EOS
    whole = gpt2_tokenizer.encode(source.read_text(encoding="utf-8"))
    assert train[:-1].tolist() + val[:-1].tolist() == whole  # the tail of the one tokenization
    assert 0.01 * len(whole) <= len(val) - 1 < 0.01 * len(whole) + data.TAIL_LINE_SEARCH
    assert gpt2_tokenizer.decode(train[:-1].tolist()).endswith("\n")  # validation starts a line
    torch.testing.assert_close(np.load(tmp_path / "out" / "token_counts.npy"), np.bincount(train, minlength=50257))
    TokenDataset(tmp_path / "out", "val").check_fits(1024)  # a window of GPT-2's length fits


def test_tail_start_and_line_cut():
    assert data.tail_start(1_000_000, 0.0005) == 1_000_000 - 10_000  # 1%
    assert data.tail_start(1_000_000, 0.1) == 900_000
    assert data.tail_start(100_000, 0.0005) == 100_000 - data.TAIL_MIN_TOKENS
    assert data.tail_start(10, 0.0005) == 5  # at most half
    ids = np.array([1, 9, 1, 1, 9, 1, 1, 1])  # 9 ends a line
    assert data.line_cut(ids, 4, lambda t: t == 9) == 2  # back to the last line end
    assert data.line_cut(ids, 1, lambda t: t == 9) == 2  # none before: the next one
    assert data.line_cut(ids, 6, lambda t: t == 9) == 5
    assert data.line_cut(ids, 3, lambda t: False) == 3


def test_one_document_too_short_or_val_docs(tmp_path, small_tokenizer):
    (tmp_path / "one.txt").write_text("document")
    with pytest.raises(DistilleryError, match="too short to hold out"):
        prepare_corpus([tmp_path / "one.txt"], small_tokenizer, tmp_path / "out", progress=False)
    with pytest.raises(DistilleryError, match="drop --val-docs to hold out the tail"):
        prepare_corpus([tmp_path / "one.txt"], small_tokenizer, tmp_path / "out", val_docs=1, progress=False)
    meta = prepare_corpus([tmp_path / "one.txt"], small_tokenizer, tmp_path / "out", val_fraction=0.0,
                          progress=False)
    assert meta["val_split"] == "documents" and meta["counts"]["val_tokens"] == 0
