"""Sentences for embedding distillation: a corpus split into sentences (or lines), kept as text.

`distillery prepare CORPUS --sentences --out DIR` writes DIR/train.txt and DIR/val.txt, one
sentence per line, and DIR/meta.json. Sentences stay text because the embedding objective
tokenizes each batch with the teacher's own tokenizer and sentence length (the Rust tokenizer
takes about a millisecond for a batch of 64), so one prepared folder serves any encoder pair.

Plain text is cut into paragraphs at blank lines, each paragraph's lines are joined (books are
hard-wrapped), and paragraphs are cut after ., ! or ? followed by a space and a capital letter
or quote. `--split lines` takes every line as it is instead, for corpora that already hold one
sentence per line. Project Gutenberg's header and licence are dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distillery.models.common import DistilleryError, plural

FORMAT = "distillery-sentences"
FORMAT_VERSION = 1
META_NAME = "meta.json"
SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}
SPLIT_MODES = ("sentences", "lines")

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_ENDS_WITH_ABBREVIATION = re.compile(r"(\b(Mr|Mrs|Ms|Dr|St|Mt|Jr|Sr|Col|Capt|Gen|Lt|Rev|Prof|vs|etc|No|Vol|ch)"
                                     r"|\b[A-Z])\.$")
_GUTENBERG_START = re.compile(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^\n]*\n", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's START and END markers (the text itself if it has none)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    return text[:end.start()] if end else text


def split_sentences(text: str) -> Iterator[str]:
    """Sentences of a text: paragraphs at blank lines, lines joined, cut after sentence ends (but
    not after a title such as "Mrs." or an initial)."""
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n")):
        joined = " ".join(paragraph.split())
        pending = ""
        if not joined:
            continue
        for part in _SENTENCE_END.split(joined):
            pending = f"{pending} {part}" if pending else part
            if not _ENDS_WITH_ABBREVIATION.search(pending):
                yield pending.strip()
                pending = ""
        if pending.strip():
            yield pending.strip()


def keep_sentence(sentence: str, min_words: int, max_chars: int) -> bool:
    """Long enough to mean something, short enough to be one sentence, and mostly letters."""
    if len(sentence) > max_chars or len(sentence.split()) < min_words:
        return False
    letters = sum(c.isalpha() for c in sentence)
    return letters >= 0.6 * len(sentence.replace(" ", ""))


def prepare_sentences(inputs: Iterable[str], out: Path, *, split: str = "sentences", include: list[str] | None = None,
                      text_field: str = "text", val_sentences: int = 1000, min_words: int = 4,
                      max_chars: int = 400, max_sentences: int | None = None, seed: int = 0,
                      overwrite: bool = False) -> dict[str, Any]:
    """Write DIR/train.txt, DIR/val.txt and DIR/meta.json; return the metadata.

    Duplicates are dropped, the rest shuffled with `seed`, and the first `val_sentences` held out.
    """
    from distillery.distill.data import ReadStats, find_sources, read_pieces

    if split not in SPLIT_MODES:
        raise DistilleryError(f"--split must be one of {', '.join(SPLIT_MODES)}, got {split!r}.")
    for name, value in (("--val-sentences", val_sentences), ("--min-words", min_words), ("--max-chars", max_chars)):
        if value <= 0:
            raise DistilleryError(f"{name} must be a positive integer, got {value}.")
    from distillery.cli_types import OutputFolder

    inputs = list(inputs)
    target = OutputFolder(out, "--out", overwrite=overwrite, inputs=inputs)  # refused before any reading
    out = Path(out)
    sources = find_sources(inputs, include, exclude=out)
    stats = ReadStats()
    seen: set[str] = set()
    sentences: list[str] = []
    buffer: dict[str, list[str]] = {}
    for piece in read_pieces(sources, text_field, stats):
        # A document may come in pieces; cut it into sentences once it is whole.
        buffer.setdefault(piece.key, []).append(piece.text)
        if not piece.last:
            continue
        text = "".join(buffer.pop(piece.key))
        candidates = split_sentences(strip_gutenberg(text)) if split == "sentences" else \
            (" ".join(line.split()) for line in text.splitlines())
        for sentence in candidates:
            if keep_sentence(sentence, min_words, max_chars) and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    if len(sentences) <= val_sentences:
        raise DistilleryError(f"The corpus gave {plural(len(sentences), 'sentence')} of at least {plural(min_words, 'word')}, "
                              f"not more than the {val_sentences} held out for validation; add text or lower --val-sentences.")
    random.Random(seed).shuffle(sentences)
    val, train = sentences[:val_sentences], sentences[val_sentences:]
    if max_sentences is not None:
        train = train[:max_sentences]
    texts = {name: "".join(s + "\n" for s in rows) for name, rows in (("train", train), ("val", val))}
    digest = hashlib.sha256()
    for text in texts.values():  # train, then val: the digest of both files' bytes in turn
        digest.update(text.encode("utf-8"))
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "split": split, "min_words": min_words,
            "max_chars": max_chars, "seed": seed, "files": stats.files, "bytes": stats.bytes,
            "sources": [s.key for s in sources][:100],
            "counts": {"train": len(train), "val": len(val)}, "sha256": digest.hexdigest()}
    # Written beside --out and swapped in whole: a failure or Ctrl-C leaves earlier data as it was.
    with target.staged() as folder:
        for name, text in texts.items():
            (folder / SPLIT_FILES[name]).write_text(text, encoding="utf-8")
        (folder / META_NAME).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return meta


def data_format(directory: str | Path) -> str | None:
    """The "format" of a prepared folder's meta.json: sentences, tokens, or None (no readable meta.json)."""
    meta = Path(directory) / META_NAME
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text()).get("format")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def read_sentences(directory: str | Path, split: str) -> list[str]:
    """One split of a folder written by `prepare --sentences`."""
    from distillery.distill.data import FORMAT as TOKEN_FORMAT

    directory = Path(directory)
    found = data_format(directory)
    if found == TOKEN_FORMAT:
        raise DistilleryError(f"{directory} holds token data for the language-model objectives (made by `distillery "
                              "prepare --tokenizer`); the embedding objective reads sentences: make them with "
                              "`distillery prepare CORPUS --sentences --out DIR`.")
    if found != FORMAT:
        raise DistilleryError(f"{directory} holds no sentence data; make it with `distillery prepare CORPUS "
                              f"--sentences --out {directory}`.")
    file = directory / SPLIT_FILES[split]
    if not file.is_file():
        raise DistilleryError(f"{file} is missing; prepare the data again.")
    return [line for line in file.read_text(encoding="utf-8").split("\n") if line]
