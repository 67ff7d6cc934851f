"""Training a byte-level BPE tokenizer on text files, with the tokenizers library's trainer.

Special tokens come first in the vocabulary: gpt2 style has `<|endoftext|>` at id 0; roberta style
has <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, with <mask> absorbing the space before it as in RoBERTa.
Every one of the 256 bytes is in the vocabulary, so any text encodes without an unknown token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, pre_tokenizers, trainers
from tokenizers.models import BPE

from distillery.tokenizer.tokenizer import (
    STYLE_SPECIAL_TOKENS,
    STYLES,
    Tokenizer,
    TokenizerError,
    build_backend,
)

STYLE_TRAINING_TOKENS = {"gpt2": ["<|endoftext|>"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}
LINES_PER_BATCH = 2000


def train_tokenizer(files: list[str | os.PathLike], vocab_size: int, style: str, out_dir: str | os.PathLike,
                    model_max_length: int | None = None, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids on `files` and save it to `out_dir`.

    Files are read as UTF-8 (a BOM is dropped, invalid bytes become U+FFFD, line ends are kept).
    The saved folder loads in distillery (`load_tokenizer`) and in transformers (`AutoTokenizer`).
    """
    if style not in STYLES:
        raise TokenizerError(f"style {style!r} is not one of {', '.join(STYLES)}; pass --style gpt2 or roberta.")
    paths = _check_files(files)
    specials = STYLE_TRAINING_TOKENS[style]
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 bytes plus "
                             f"{len(specials)} special token(s); pass at least {smallest + 1}.")
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
