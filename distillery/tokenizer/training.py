"""Training a byte-level BPE or WordPiece tokenizer on text files, with the tokenizers library's trainers.

Special tokens come first in the vocabulary: gpt2 style has `<|endoftext|>` at id 0; roberta style
has <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, with <mask> absorbing the space before it as in RoBERTa.
Every one of the 256 bytes is in the vocabulary, so any text encodes without an unknown token.

bert style trains a WordPiece vocabulary (lower-cased unless `lowercase=False`) with
[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, the order transformers' BertTokenizer gives a fresh
vocabulary (Google's BERT vocabularies have them at 0 and 100-103, after [unused] slots; a new
vocabulary has no reason to keep those). Characters the corpus never shows are not in the
alphabet, so a word holding one encodes as [UNK].
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, pre_tokenizers, trainers
from tokenizers.models import BPE, WordPiece

from distillery.models.common import plural
from distillery.tokenizer.tokenizer import (
    STYLE_SPECIAL_TOKENS,
    STYLES,
    WORDPIECE_MAX_WORD_CHARS,
    Tokenizer,
    TokenizerError,
    build_backend,
    build_wordpiece_backend,
    wordpiece_tokenizer,
)

STYLE_TRAINING_TOKENS = {"gpt2": ["<|endoftext|>"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                         "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
LINES_PER_BATCH = 2000


def train_tokenizer(files: list[str | os.PathLike], vocab_size: int, style: str, out_dir: str | os.PathLike,
                    model_max_length: int | None = None, show_progress: bool = True,
                    lowercase: bool = True) -> Tokenizer:
    """Train a byte-level BPE (gpt2, roberta) or a WordPiece (bert) of `vocab_size` ids on `files`
    and save it to `out_dir`; `lowercase` applies to bert only (False for a cased vocabulary).

    Files are read as UTF-8 (a BOM is dropped, invalid bytes become U+FFFD, line ends are kept).
    The saved folder loads in distillery (`load_tokenizer`) and in transformers (`AutoTokenizer`).
    """
    if style not in STYLES:
        raise TokenizerError(f"style {style!r} is not one of {', '.join(STYLES)}; pass --style "
                             f"{', '.join(STYLES[:-1])} or {STYLES[-1]}.")
    paths = _check_files(files)
    if style == "bert":
        return _train_wordpiece(paths, vocab_size, out_dir, model_max_length, show_progress, lowercase)
    specials = STYLE_TRAINING_TOKENS[style]
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 bytes plus "
                             f"{plural(len(specials), 'special token')}; pass at least {smallest + 1}.")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False, lstrip=t == "<mask>") for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend = build_backend(BPE(), style)
    read = {"chars": 0}
    backend.train_from_iterator(_line_batches(paths, read), trainer=trainer)
    if read["chars"] == 0:
        raise TokenizerError(f"The training files ({', '.join(map(str, paths))}) hold no text; pass files with "
                             "text in them.")
    # build_backend added the special tokens before the trainer put them into the vocabulary, so
    # rebuild around the trained model: added tokens and post-processor then use the final ids.
    tokenizer = Tokenizer(build_backend(backend.model, style), style, dict(STYLE_SPECIAL_TOKENS[style]),
                          model_max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _train_wordpiece(paths: list[Path], vocab_size: int, out_dir: str | os.PathLike, model_max_length: int | None,
                     show_progress: bool, lowercase: bool) -> Tokenizer:
    specials = STYLE_TRAINING_TOKENS["bert"]
    if vocab_size <= len(specials):
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a WordPiece vocabulary needs the "
                             f"{len(specials)} special tokens plus the corpus's characters; pass more.")
    special_tokens = dict(STYLE_SPECIAL_TOKENS["bert"])
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    model = WordPiece(unk_token=special_tokens["unk_token"], continuing_subword_prefix="##",
                      max_input_chars_per_word=WORDPIECE_MAX_WORD_CHARS)
    backend = wordpiece_tokenizer(model, lowercase=lowercase)
    read = {"chars": 0}
    backend.train_from_iterator(_line_batches(paths, read), trainer=trainer)
    if read["chars"] == 0:
        raise TokenizerError(f"The training files ({', '.join(map(str, paths))}) hold no text; pass files with "
                             "text in them.")
    # The template needs the final ids of [CLS] and [SEP], so the backend is built after training.
    tokenizer = Tokenizer(build_wordpiece_backend(backend.model, special_tokens, lowercase=lowercase), "bert",
                          special_tokens, model_max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _check_files(files: list[str | os.PathLike]) -> list[Path]:
    if not files:
        raise TokenizerError("No training files given; pass one or more text files.")
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        if path.is_dir():
            raise TokenizerError(f"{path} is a folder; pass the text files in it (for example {path}/*.txt).")
        if not path.is_file():
            raise TokenizerError(f"Training file {path} does not exist; check the path.")
    if all(path.stat().st_size == 0 for path in paths):
        raise TokenizerError(f"The training files ({', '.join(map(str, paths))}) are empty; pass files with text "
                             "in them.")
    return paths


def _line_batches(paths: list[Path], read: dict[str, int]) -> Iterator[list[str]]:
    """Lists of lines (line ends kept), read lazily so a large corpus never sits in memory;
    `read["chars"]` counts the characters handed out."""
    for path in paths:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            batch: list[str] = []
            for line in f:
                batch.append(line)
                read["chars"] += len(line)
                if len(batch) == LINES_PER_BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch
