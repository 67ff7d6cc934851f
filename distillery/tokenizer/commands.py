"""`distillery tokenizer train`: train a byte-level BPE or WordPiece tokenizer on text files."""

from __future__ import annotations

import argparse
import os
import time

from distillery.models.common import plural
from distillery.tokenizer.tokenizer import STYLES, TokenizerError


def register(subparsers) -> None:
    """Add `tokenizer` and its subcommands to the CLI."""
    from distillery import cli_types
    from distillery.cli import add_command

    group = subparsers.add_parser("tokenizer", help="Train byte-level BPE and WordPiece tokenizers.",
                                  description="Train byte-level BPE and WordPiece tokenizers.")
    commands = group.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    p = add_command(commands, "train", train)
    p.add_argument("files", nargs="+", metavar="FILES", type=cli_types.existing_file,
                   help="UTF-8 text files to learn the vocabulary from")
    p.add_argument("--vocab-size", type=cli_types.int_range(1, cli_types.MAX_VOCAB_SIZE), required=True,
                   help="number of ids, special tokens included")
    p.add_argument("--style", choices=STYLES, default="gpt2",
                   help="gpt2: byte-level BPE, <|endoftext|> (id 0); roberta: byte-level BPE, <s> <pad> </s> "
                        "<unk> <mask> (ids 0-4); bert: WordPiece, [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4)")
    p.add_argument("--cased", action="store_true",
                   help="bert style: keep upper case and accents, as BERT's cased vocabularies do (without it: "
                        "lower-cased, accents stripped)")
    p.add_argument("--out", required=True, type=cli_types.output_folder, help="folder to save the tokenizer files in")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    p.add_argument("--model-max-length", type=cli_types.positive_int, default=None,
                   help="longest input the model takes (default: 1024 for gpt2, 512 for roberta and bert)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE (gpt2, roberta) or WordPiece (bert) tokenizer on FILES and save it to --out.

    The folder holds tokenizer.json, the vocabulary (vocab.json + merges.txt, or vocab.txt for
    bert), tokenizer_config.json and special_tokens_map.json, which distillery and transformers'
    AutoTokenizer both load.
    """
    from distillery.cli import print_json
    from distillery.cli_types import OutputFolder
    from distillery.tokenizer.training import train_tokenizer

    if args.cased and args.style != "bert":
        raise TokenizerError("--cased applies to --style bert only (byte-level BPE keeps case anyway); drop it "
                             "or pass --style bert.")
    if any((args.out / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        # Replacing a model's vocabulary leaves ids that no longer match its embeddings.
        raise TokenizerError(f"--out {args.out} holds a model, whose embeddings belong to its own tokenizer; save the "
                             "new tokenizer in another folder.")
    target = OutputFolder(args.out, overwrite=args.overwrite, inputs=args.files)
    start = time.perf_counter()
    with target.staged() as folder:
        tokenizer = train_tokenizer(args.files, args.vocab_size, args.style, folder,
                                    model_max_length=args.model_max_length, show_progress=not args.json,
                                    lowercase=not args.cased)
    result = {
        "out": str(args.out),
        "style": tokenizer.style,
        "vocab_size": tokenizer.vocab_size,
        "files": len(args.files),
        "bytes": sum(os.path.getsize(f) for f in args.files),
        "seconds": round(time.perf_counter() - start, 2),
        "fingerprint": tokenizer.fingerprint(),
    }
    if args.json:
        print_json(result)
    else:
        print(f"Trained a {result['style']} tokenizer of {result['vocab_size']} ids on {plural(result['files'], 'file')} "
              f"({result['bytes'] / 1e6:.1f} MB) in {result['seconds']} s; saved to {result['out']}")
    return 0
