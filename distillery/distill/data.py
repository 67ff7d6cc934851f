"""Corpus preparation: text in, memory-mapped token files out.

`prepare_corpus` reads documents one at a time (a text file is one document, read line by line;
a .jsonl line, or a record of a .parquet file, an Arrow file or a folder saved by Hugging Face
`datasets`, is one document, read one record batch at a time), tokenizes them in large batches with
the tokenizers library (all cores), and appends the ids to DIR/train.bin and DIR/val.bin, each
document followed by the end-of-text token. Memory stays constant whatever the corpus size. At the
end it writes DIR/token_counts.npy (how often each id occurs in train, for MLM masking), a copy of
the tokenizer in DIR/tokenizer/, and last DIR/meta.json, so a folder with a meta.json is always
complete.

The train/validation split is by document: each document has a key (its path, or path:row for a
record) hashed with the seed, and the documents with the smallest hashes are held out. The choice
is deterministic and barely moves when files are added to the corpus. A corpus of one document
(one text file) has nothing to hold out that way, so the tail of that document is held out instead.

`TokenDataset` reads the files back as a memory map and cuts random or sequential windows.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.distill.sentences import FORMAT as SENTENCE_FORMAT
from distillery.models.checkpoint import atomic_write, write_json
from distillery.models.common import DistilleryError, read_json

META_NAME = "meta.json"
TOKEN_COUNTS_NAME = "token_counts.npy"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
FORMAT = "distillery-tokens"
FORMAT_VERSION = 1
DEFAULT_VAL_FRACTION = 0.0005
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".arrow")  # read with pyarrow, one record batch at a time
TABLE_BATCH_ROWS = 1024
BOM = "\ufeff"

# Text files are tokenized in pieces of about this many characters, so that one huge file
# neither fills memory nor keeps the other cores idle; batches of pieces go to encode_batch.
CHUNK_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
# If no tokenization-neutral place to cut turns up, cut at a line end anyway after this many.
FORCED_CHUNK_CHARS = 1 << 20
SNIFF_BYTES = 8192
# A single document's held-out tail: max(val_fraction, 1%) of its tokens and at least four windows
# of GPT-2's 1024 positions (plus one token), at most half the document; cut after a line end found
# within TAIL_LINE_SEARCH tokens, so that validation text starts at the start of a line.
TAIL_MIN_FRACTION = 0.01
TAIL_MIN_TOKENS = 4 * 1024 + 1
TAIL_LINE_SEARCH = 2048


# ----------------------------------------------------------------------------------------------
# Finding documents


@dataclass
class Piece:
    """Text of one document, or a part of it; `last` marks the document's final piece."""

    key: str
    text: str
    last: bool


@dataclass
class ReadStats:
    """What the readers saw, reported in meta.json."""

    files: int = 0
    bytes: int = 0
    invalid_utf8_documents: int = 0
    skipped_records: int = 0


@dataclass
class Source:
    """One input: a text file, a .jsonl file, a table (.parquet or .arrow file), a folder saved by
    `datasets` (save_to_disk), or a Hugging Face hub dataset."""

    kind: str  # "text", "jsonl", "table", "saved" or "hub"
    path: Path | None
    key: str  # stable name used in document keys

    def size(self) -> int:
        """Bytes to read, for the progress bar (unknown, 0, for hub datasets)."""
        return 0 if self.kind == "hub" else sum(path.stat().st_size for path in table_files(self))


def find_sources(
    inputs: Iterable[str | os.PathLike], include: list[str] | None, exclude: Path | None = None
) -> list[Source]:
    """Expand INPUT arguments into sources, folders searched recursively in sorted order.

    In folders, files matching an `include` glob are taken (by file name, or by path relative
    to the folder when the pattern holds a '/'); without `include`, .parquet and .arrow files and
    every file that looks like text (no NUL byte in its first 8 KiB). A folder saved by `datasets`
    is one source, found at any depth (with `include`, when a glob matches its name). Hidden files
    and folders are skipped, and anything under `exclude` (the output folder, when it lies inside
    an input folder).
    """
    sources: list[Source] = []
    for arg in inputs:
        path = Path(arg).expanduser()
        if path.is_file():
            sources.append(_file_source(path, path.name))
        elif path.is_dir():
            if _is_hf_dataset_dir(path):
                sources.append(Source("saved", path, path.name))
                continue
            found = _folder_sources(path, include, exclude)
            if not found:
                what = f"matching {', '.join(include)}" if include else "that look like text"
                raise DistilleryError(f"folder {path} has no files {what}; check the path or pass --include GLOB.")
            sources.extend(found)
        elif _looks_like_hub_dataset(str(arg)) and _datasets_available():
            sources.append(Source("hub", None, str(arg)))
        else:
            hint = "" if _datasets_available() or not _looks_like_hub_dataset(str(arg)) else (
                " (a Hugging Face dataset name needs the `datasets` package: pip install datasets)")
            raise DistilleryError(f"input {arg} does not exist{hint}; check the path.")
    return sources


def _folder_sources(root: Path, include: list[str] | None, exclude: Path | None) -> list[Source]:
    sources: list[Source] = []
    saved: list[Path] = []  # datasets folders found so far: their own files are not documents
    for path in sorted(root.rglob("*")):  # a folder sorts before the files inside it
        if _inside(path, exclude) or any(path.is_relative_to(folder) for folder in saved):
            continue
        key = f"{root.name}/{path.relative_to(root).as_posix()}"
        if path.is_dir() and _is_hf_dataset_dir(path):
            saved.append(path)
            if _wanted(path, root, include):
                sources.append(Source("saved", path, key))
        elif path.is_file() and _wanted(path, root, include):
            sources.append(_file_source(path, key))
    return sources


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def _file_source(path: Path, key: str) -> Source:
    suffix = path.suffix.lower()
    kind = "jsonl" if suffix in JSONL_SUFFIXES else "table" if suffix in TABLE_SUFFIXES else "text"
    return Source(kind, path, key)


def _wanted(path: Path, root: Path, include: list[str] | None) -> bool:
    relative = path.relative_to(root)
    if any(part.startswith(".") for part in relative.parts):  # .git, .venv, editor files
        return False
    if include:
        return any(fnmatch.fnmatch(relative.as_posix() if "/" in g else path.name, g) for g in include)
    if path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES:
        return True
    with path.open("rb") as f:
        return b"\0" not in f.read(SNIFF_BYTES)


def _is_hf_dataset_dir(path: Path) -> bool:
    # What datasets' save_to_disk writes for a Dataset and a DatasetDict.
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _looks_like_hub_dataset(name: str) -> bool:
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "." not in name


def _datasets_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


# ----------------------------------------------------------------------------------------------
# Reading documents


def _decode(raw: bytes) -> tuple[str, bool]:
    """(text, had_invalid_utf8); invalid bytes become U+FFFD; CRLF and lone CR become LF."""
    try:
        text, invalid = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, invalid = raw.decode("utf-8", errors="replace"), True
    return normalise_newlines(text), invalid


def normalise_newlines(text: str) -> str:
    """CRLF and lone CR become LF, as Python's universal newlines do."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _safe_cut(piece_tail: str, next_line: str) -> bool:
    """Cutting between "...x\\n" and "y..." (x, y not whitespace) changes no token.

    Byte-level BPE pre-tokenizers split before and after such a lone newline, so the pieces
    tokenize to exactly the ids of the whole; a cut inside a run of blank lines or before
    indentation would not (runs of whitespace merge into one token).
    """
    return (len(piece_tail) >= 2 and piece_tail[-1] == "\n" and not piece_tail[-2].isspace()
            and bool(next_line) and not next_line[0].isspace())


def read_text_file(source: Source, stats: ReadStats) -> Iterator[Piece]:
    """One document per file, yielded in pieces of about CHUNK_CHARS cut where tokens do not change."""
    invalid = False
    piece: list[str] = []
    size = 0
    with source.path.open("rb") as f:
        for i, raw in enumerate(f):
            stats.bytes += len(raw)
            line, bad = _decode(raw)
            invalid |= bad
            if i == 0:
                line = line.removeprefix(BOM)
            if piece and size >= CHUNK_CHARS and (_safe_cut(piece[-1], line) or size >= FORCED_CHUNK_CHARS):
                yield Piece(source.key, "".join(piece), last=False)
                piece, size = [], 0
            piece.append(line)
            size += len(line)
    stats.invalid_utf8_documents += invalid
    yield Piece(source.key, "".join(piece), last=True)


def read_jsonl_file(source: Source, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """One document per line holding a string `text_field`; other lines are counted and skipped.

    A file where no line has the field is an error: --text-field is almost certainly wrong.
    """
    lines, documents, fields = 0, 0, set()
    with source.path.open("rb") as f:
        for i, raw in enumerate(f):
            stats.bytes += len(raw)
            line, bad = _decode(raw)
            if i == 0:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.skipped_records += 1
                if isinstance(record, dict):
                    fields.update(list(record)[:20])
                continue
            documents += 1
            stats.invalid_utf8_documents += bad
            yield Piece(f"{source.key}:{i}", normalise_newlines(text), last=True)
    if lines and not documents:
        seen = f" (fields seen: {', '.join(sorted(fields)[:10])})" if fields else ""
        raise DistilleryError(f"none of the {lines} lines of {source.path} is a JSON object with a string "
                              f"field {text_field!r}{seen}; pass --text-field NAME.")


def read_table(source: Source, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """One document per record of a .parquet or .arrow file or a `datasets` folder: its string
    `text_field`, read one record batch at a time; records where it is null are counted and skipped."""
    row = 0
    for path in table_files(source):
        start = stats.bytes
        for texts, read in _text_batches(path, text_field):
            for text in texts.to_pylist():
                if text is None:
                    stats.skipped_records += 1
                else:
                    yield Piece(f"{source.key}:{row}", normalise_newlines(text), last=True)
                row += 1
            stats.bytes = start + read


def table_files(source: Source) -> list[Path]:
    """The files of a table source: itself, or the Arrow files of a `datasets` folder in order.

    save_to_disk writes data-NNNNN-of-NNNNN.arrow files (Arrow streams) listed in state.json
    ("_data_files"), beside dataset_info.json; a DatasetDict writes dataset_dict.json ({"splits":
    [...]}) and one such folder per split. Only the train split is read, so that a dataset's own
    test split stays unseen (validation is held out of train as for any corpus); pass DIR/SPLIT to
    read another split.
    """
    if source.kind != "saved":
        return [source.path]
    folder = source.path
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits", [])
        if "train" not in splits or not (folder / "train").is_dir():
            raise DistilleryError(f"the datasets folder {folder} has no train split (it has {splits}); pass the "
                                  f"split's own folder, such as {folder / (splits[0] if splits else 'SPLIT')}.")
        folder = folder / "train"
    entries = _read_json(folder / "state.json").get("_data_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
        raise DistilleryError(f"{folder / 'state.json'} lists no data files (_data_files); save the dataset "
                              "again with save_to_disk.")
    files = [folder / entry["filename"] for entry in entries]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DistilleryError(f"the datasets folder {folder} lacks {', '.join(missing[:3])} that its state.json "
                              "lists; copy the whole folder or save the dataset again.")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    fix = "save the dataset again with save_to_disk"
    try:
        value = read_json(path, fix=fix)
    except OSError as e:
        raise DistilleryError(f"{path} is not readable ({e}); {fix}.") from e
    if not isinstance(value, dict):
        raise DistilleryError(f"{path} holds no JSON object; save the dataset again with save_to_disk.")
    return value


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - the submodules are used as attributes of pyarrow
    except ImportError as e:
        raise DistilleryError(f"reading {path} needs pyarrow; pip install pyarrow (or distillery[data]).") from e
    return pyarrow


def _text_batches(path: Path, text_field: str) -> Iterator[tuple[Any, int]]:
    """(the text column of one record batch, bytes of the file read so far) for a .parquet file or
    an Arrow file (the stream format save_to_disk writes, or the random-access file format)."""
    pa = _pyarrow(path)
    if path.suffix.lower() == ".parquet":
        parquet = _open_parquet(pa, path)
        _check_text_column(parquet.schema_arrow, text_field, path)
        rows, size, done = parquet.metadata.num_rows, path.stat().st_size, 0
        for batch in parquet.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[text_field]):
            done += batch.num_rows
            yield batch.column(0), size * done // max(rows, 1)
        return
    with pa.memory_map(str(path)) as f:  # batches are views of the mapped file, not copies
        schema, batches = _open_arrow(pa, f, path)
        _check_text_column(schema, text_field, path)
        for batch in batches:
            yield batch.column(text_field), f.tell()


def _open_parquet(pa, path: Path):
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DistilleryError(f"{path} is not a readable parquet file ({e}); check the file.") from e


def _open_arrow(pa, f, path: Path) -> tuple[Any, Iterator[Any]]:
    try:
        reader = pa.ipc.open_stream(f)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        f.seek(0)
    try:
        reader = pa.ipc.open_file(f)
    except pa.ArrowInvalid as e:
        raise DistilleryError(f"{path} is not an Arrow file ({e}); check the file.") from e
    return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _check_text_column(schema, text_field: str, path: Path) -> None:
    """The file has a string column `text_field`, or a sentence naming the columns it has."""
    import pyarrow as pa

    names = schema.names
    if text_field not in names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DistilleryError(f"{path} has no column {text_field!r} (it has {shown}); pass --text-field NAME.")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or
            getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DistilleryError(f"column {text_field!r} of {path} holds {kind}, not text; pass --text-field NAME of "
                              "a text column.")


def _row_count(path: Path, text_field: str) -> int:
    """Records in a table file, its text column checked first (parquet: from its footer, unread)."""
    pa = _pyarrow(path)
    if path.suffix.lower() == ".parquet":
        parquet = _open_parquet(pa, path)
        _check_text_column(parquet.schema_arrow, text_field, path)
        return parquet.metadata.num_rows
    return sum(len(texts) for texts, _ in _text_batches(path, text_field))


def read_hub_dataset(source: Source, text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """Records of a Hugging Face hub dataset's train split, through `datasets` and its cache."""
    for i, text in enumerate(_hub_dataset_texts(source, text_field)):
        if not isinstance(text, str):
            stats.skipped_records += 1
            continue
        stats.bytes += len(text.encode("utf-8"))
        yield Piece(f"{source.key}:{i}", normalise_newlines(text), last=True)


def _open_hub_dataset(source: Source):
    try:
        import datasets
    except ImportError as e:
        raise DistilleryError(f"reading the dataset {source.key} needs the `datasets` package; "
                              "pip install datasets, or export the text to .jsonl or .parquet.") from e
    return datasets.load_dataset(source.key, split="train")


def _hub_dataset_texts(source: Source, text_field: str) -> Iterator[Any]:
    data = _open_hub_dataset(source)
    if text_field not in data.column_names:
        raise DistilleryError(f"dataset {source.key} has no column {text_field!r} (it has "
                              f"{data.column_names}); pass --text-field NAME.")
    for record in data:
        yield record[text_field]


def read_pieces(sources: list[Source], text_field: str, stats: ReadStats) -> Iterator[Piece]:
    """Every document of every source, in order, as pieces."""
    for source in sources:
        stats.files += 1
        if source.kind == "text":
            yield from read_text_file(source, stats)
        elif source.kind == "jsonl":
            yield from read_jsonl_file(source, text_field, stats)
        elif source.kind == "hub":
            yield from read_hub_dataset(source, text_field, stats)
        else:
            yield from read_table(source, text_field, stats)


# ----------------------------------------------------------------------------------------------
# The train/validation split


def document_keys(source: Source, text_field: str = "text") -> Iterator[str]:
    """The keys of a source's documents, without tokenizing: a file, or one per .jsonl line or
    record (a table's text column is checked here, before any tokenizing)."""
    if source.kind == "text":
        if source.size():
            yield source.key
    elif source.kind == "jsonl":
        with source.path.open("rb") as f:
            yield from (f"{source.key}:{i}" for i, raw in enumerate(f) if raw.strip())
    elif source.kind == "hub":
        yield from (f"{source.key}:{i}" for i in range(len(_open_hub_dataset(source))))
    else:
        rows = sum(_row_count(path, text_field) for path in table_files(source))
        yield from (f"{source.key}:{i}" for i in range(rows))


def _key_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest(), "big")


def choose_val_keys(
    sources: list[Source], val_fraction: float, val_docs: int | None, seed: int, text_field: str = "text"
) -> set[str]:
    """Keys of the held-out documents: the n with the smallest seeded hashes.

    n = val_docs, or round(val_fraction * documents) but at least one when the fraction is
    positive and there are two documents or more. At least one document always stays in train
    (one document alone gets its tail held out, see `tail_start`). Documents are counted before
    reading them (empty files and blank lines excluded), so a record later skipped for lacking
    the text field can take a validation place.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DistilleryError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    total = sum(1 for source in sources for _ in document_keys(source, text_field))
    if val_docs is not None:
        if val_docs < 0 or (val_docs >= total and val_docs > 0):
            fix = "drop --val-docs to hold out the tail of the document instead" if total == 1 else "hold out fewer"
            raise DistilleryError(f"--val-docs {val_docs} leaves no training documents: the corpus has "
                                  f"{total}; {fix}.")
        n_val = val_docs
    else:
        n_val = min(max(1, round(val_fraction * total)), total - 1) if val_fraction > 0 and total >= 2 else 0
    keys = (key for source in sources for key in document_keys(source, text_field))
    return set(heapq.nsmallest(n_val, keys, key=lambda k: _key_hash(k, seed)))


def tail_start(n_tokens: int, val_fraction: float) -> int:
    """Where a lone document's held-out tail begins, before moving to a line end:
    n - min(max(ceil(max(val_fraction, 1%) * n), TAIL_MIN_TOKENS), n // 2)."""
    size = max(math.ceil(max(val_fraction, TAIL_MIN_FRACTION) * n_tokens), TAIL_MIN_TOKENS)
    return n_tokens - min(size, n_tokens // 2)


def line_cut(ids: np.ndarray, start: int, ends_line) -> int:
    """The cut nearest `start` that follows a token ending a line: the last one at or before it
    within TAIL_LINE_SEARCH tokens, else the first after it; `start` when none is found.
    The cut leaves at least one token on each side."""
    for cut in range(start, max(start - TAIL_LINE_SEARCH, 1) - 1, -1):
        if ends_line(int(ids[cut - 1])):
            return cut
    for cut in range(start + 1, min(start + TAIL_LINE_SEARCH, len(ids) - 1) + 1):
        if ends_line(int(ids[cut - 1])):
            return cut
    return start


def hold_out_tail(out: Path, tokenizer, dtype: np.dtype, val_fraction: float, append_eos: bool,
                  token_counts: np.ndarray) -> int:
    """Move the tail of the one document in out/train.bin to out/val.bin; returns its tokens.

    The tail (`tail_start`, moved to a line end) keeps the document's EOS and the head gets one,
    so each split is still whole documents; token_counts lose the tail's ids.
    """
    train = out / "train.bin"
    ids = np.memmap(train, dtype=dtype, mode="r")
    n_doc = len(ids) - int(append_eos)  # the document, without its EOS
    if n_doc < 2:
        raise DistilleryError(f"the corpus is one document of {n_doc} token(s), too short to hold out validation "
                              "text; pass more text, or --val-fraction 0 for no validation split.")
    endings: dict[int, bool] = {}

    def ends_line(token: int) -> bool:
        if token not in endings:
            endings[token] = tokenizer.decode([token]).endswith("\n")
        return endings[token]

    cut = line_cut(ids[:n_doc], tail_start(n_doc, val_fraction), ends_line)
    tail = np.array(ids[cut:])  # with the EOS
    del ids  # unmap before truncating
    token_counts -= np.bincount(tail[:n_doc - cut], minlength=len(token_counts))[:len(token_counts)]
    with atomic_write(out / "val.bin") as f:
        f.write(tail.tobytes())
    os.truncate(train, cut * dtype.itemsize)
    with open(train, "ab") as f:
        f.write(tail[n_doc - cut:].tobytes())  # the EOS, now after the head
    return len(tail)


# ----------------------------------------------------------------------------------------------
# Preparing


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare_corpus(
    inputs: list[str | os.PathLike],
    tokenizer,
    out_dir: str | os.PathLike,
    include: list[str] | None = None,
    text_field: str = "text",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    append_eos: bool = True,
    progress: bool = True,
    val_docs: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` into out_dir/{train,val}.bin, token_counts.npy, tokenizer/ and meta.json.

    inputs: text files (one document each), folders (searched recursively; `include` globs pick
    the files, default every text-like, .parquet and .arrow file), .jsonl files (one document per
    line, from `text_field`), .parquet and .arrow files and folders written by `datasets`'
    save_to_disk (one document per record, from `text_field`, read with pyarrow), a Hugging Face
    hub name when `datasets` is installed. A corpus of one document holds out its tail.
    Text is decoded as UTF-8 (invalid bytes replaced and the documents counted), BOMs dropped,
    CRLF turned into LF; each document is followed by the EOS token when `append_eos`.
    Returns the metadata written to meta.json. An existing prepared folder is replaced only with
    `overwrite`, and only once the new data is complete: everything is written into a folder beside
    it, swapped in at the end, so a failure or Ctrl-C leaves the old data as it was.
    """
    from distillery.cli_types import OutputFolder

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    target = OutputFolder(out_dir, "--out", overwrite=overwrite, inputs=inputs)
    with target.staged() as staging:
        return _write_corpus(inputs, tokenizer, staging, target.path, include, text_field, val_fraction, seed,
                             append_eos, progress, val_docs)


def _write_corpus(inputs: list[str | os.PathLike], tokenizer, out: Path, final: Path, include: list[str] | None,
                  text_field: str, val_fraction: float, seed: int, append_eos: bool, progress: bool,
                  val_docs: int | None) -> dict[str, Any]:
    """prepare_corpus's work, written into `out`; `final` (the folder it will become) is not read
    as input when it lies inside an input folder."""
    from tqdm import tqdm

    sources = find_sources(inputs, include, exclude=final)
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise DistilleryError("the tokenizer has no end-of-text token to separate documents; give it one "
                              "(eos_token in tokenizer_config.json).")
    vocab_size = tokenizer.vocab_size
    dtype = token_dtype(vocab_size)
    val_keys = choose_val_keys(sources, val_fraction, val_docs, seed, text_field)

    stats = ReadStats()
    token_counts = np.zeros(vocab_size, dtype=np.int64)
    tokens = dict.fromkeys(SPLITS, 0)
    documents = dict.fromkeys(SPLITS, 0)
    doc_tokens = 0  # tokens so far of the document being read (its pieces may span batches)
    last_key = None  # of the last document read
    eos_ids = np.array([eos] if append_eos else [], dtype=dtype)
    total_bytes = sum(source.size() for source in sources)
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=total_bytes or None, unit="B", unit_scale=True,
                                       desc="prepare", disable=not progress, dynamic_ncols=True))
        shards = {split: stack.enter_context(atomic_write(out / f"{split}.bin")) for split in SPLITS}
        for batch in _batches(read_pieces(sources, text_field, stats)):
            encoded = tokenizer.encode_batch([piece.text for piece in batch], add_special_tokens=False)
            parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
            for piece, ids in zip(batch, encoded):
                split = "val" if piece.key in val_keys else "train"
                parts[split].append(np.asarray(ids, dtype=dtype))
                doc_tokens += len(ids)
                if piece.last:
                    if doc_tokens:
                        parts[split].append(eos_ids)
                        documents[split] += 1
                        last_key = piece.key
                    doc_tokens = 0
            for split, arrays in parts.items():
                if not arrays:
                    continue
                ids = np.concatenate(arrays)
                shards[split].write(ids.tobytes())
                tokens[split] += len(ids)
                if split == "train":
                    token_counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
            # The readers are lazy, so what they have read is what this batch held.
            bar.set_postfix(tokens=f"{sum(tokens.values()):,}", refresh=False)
            bar.update(stats.bytes - bar.n)
        if sum(tokens.values()) == 0:
            raise DistilleryError(f"the corpus ({', '.join(map(str, inputs))}) holds no text to tokenize; "
                                  "pass files with text in them.")
    # One document (one text file) cannot be split by document: hold out its tail instead.
    tail_of = last_key if val_docs is None and val_fraction > 0 and documents["train"] == 1 and not val_keys \
        else None
    if tail_of is not None:
        tokens["val"] = hold_out_tail(out, tokenizer, dtype, val_fraction, append_eos, token_counts)
        tokens["train"] -= tokens["val"] - int(append_eos)

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "tokenizer_style": tokenizer.style,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_token_id": eos,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "special_ids": list(tokenizer.all_special_ids),
        "append_eos": append_eos,
        "counts": {
            "files": stats.files,
            "bytes": stats.bytes,
            "documents": documents["train"] + documents["val"],
            "train_documents": documents["train"],
            "val_documents": documents["val"],
            "train_tokens": tokens["train"],
            "val_tokens": tokens["val"],
            "invalid_utf8_documents": stats.invalid_utf8_documents,
            "skipped_records": stats.skipped_records,
        },
        "inputs": [str(i) for i in inputs],
        "include": include,
        "text_field": text_field,
        "val_fraction": val_fraction if val_docs is None else None,
        "val_docs": val_docs,
        # "documents": whole documents held out; "tail": the end of the only document, val_tail_of.
        "val_split": "tail" if tail_of is not None else "documents",
        "val_tail_of": tail_of,
        "seed": seed,
    }
    with atomic_write(out / TOKEN_COUNTS_NAME) as f:
        np.save(f, token_counts)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    write_json(out / META_NAME, meta)
    return meta


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------
# Reading prepared data


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared data folder, with "path" (the folder) added."""
    directory = Path(path)
    file = directory / META_NAME
    if not file.is_file():
        raise DistilleryError(f"{directory} has no {META_NAME}; prepare the data there with "
                              "`distillery prepare INPUT --tokenizer TOK --out DIR`.")
    meta = read_json(file, fix="re-run distillery prepare")
    if isinstance(meta, dict) and meta.get("format") == SENTENCE_FORMAT:
        raise DistilleryError(f"{directory} holds sentence data for embedding distillation (made by `distillery prepare "
                              "--sentences`); this needs token data: make it with `distillery prepare INPUT "
                              "--tokenizer TOK --out DIR`.")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DistilleryError(f"{file} is not metadata of distillery prepare (format {FORMAT} version "
                              f"{FORMAT_VERSION}); re-run distillery prepare.")
    meta["path"] = str(directory)
    return meta


def check_tokenizer(meta: dict[str, Any], tokenizer) -> None:
    """Raise DistilleryError unless the data was prepared with this tokenizer (same fingerprint)."""
    theirs, ours = meta["tokenizer_fingerprint"], tokenizer.fingerprint()
    if theirs != ours:
        raise DistilleryError(
            f"data in {meta.get('path', 'the data folder')} was prepared with a different tokenizer "
            f"(fingerprint {theirs[:12]} vs {ours[:12]}); re-run distillery prepare with --tokenizer MODEL."
        )


class TokenDataset:
    """One split of a prepared folder as a memory map of token ids, cut into windows."""

    def __init__(self, path: str | os.PathLike, split: str = "train") -> None:
        if split not in SPLITS:
            raise DistilleryError(f"split {split!r} does not exist; choose one of {list(SPLITS)}.")
        self.meta = load_meta(path)
        self.split = split
        file = Path(path) / f"{split}.bin"
        if not file.is_file():
            raise DistilleryError(f"{file} is missing; re-run distillery prepare.")
        dtype = np.dtype(self.meta["dtype"])
        expected = self.meta["counts"][f"{split}_tokens"] * dtype.itemsize
        if file.stat().st_size != expected:
            raise DistilleryError(f"{file} has {file.stat().st_size} bytes but meta.json promises {expected}; "
                                  "it was changed or truncated, re-run distillery prepare.")
        # np.memmap cannot map an empty file; an empty split is an empty array.
        self.tokens = np.memmap(file, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def check_fits(self, seq_len: int) -> None:
        """One window of seq_len + 1 tokens fits in the split, or a sentence saying it does not."""
        if len(self) < seq_len + 1:
            fix = "hold out more with `distillery prepare --val-fraction F` or `--val-docs N`" if self.split == "val" \
                else "prepare more data"
            raise DistilleryError(
                f"the {self.split} split of {self.meta['path']} has {len(self)} tokens, fewer than one window "
                f"of {seq_len + 1}; {fix}, or lower --seq-len."
            )

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, seq_len + 1) windows starting at uniformly random positions.

        Inputs are [:, :-1] and next-token targets [:, 1:]. Windows may cross document
        boundaries (the EOS between documents tells the model so), as in GPT-2's training.
        """
        self.check_fits(seq_len)
        starts = torch.randint(0, len(self) - seq_len, (batch_size,), generator=generator).tolist()
        rows = [np.asarray(self.tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]
        return torch.from_numpy(np.stack(rows))

    def iter_sequential(self, batch_size: int, seq_len: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Consecutive windows from token `start` on: window i covers tokens
        [start + i * seq_len, start + (i + 1) * seq_len], so every token after the first is
        predicted exactly once. Batches hold up to batch_size windows (the last may hold fewer);
        a tail shorter than a window is left out.
        """
        self.check_fits(seq_len)
        n_windows = (len(self) - start - 1) // seq_len
        for first in range(0, n_windows, batch_size):
            count = min(batch_size, n_windows - first)
            lo = start + first * seq_len
            block = np.asarray(self.tokens[lo:lo + count * seq_len + 1], dtype=np.int64)
            rows = [block[i * seq_len:(i + 1) * seq_len + 1] for i in range(count)]
            yield torch.from_numpy(np.stack(rows))
