"""`distillery tokenizer train`: train a byte-level BPE tokenizer on text files."""

from __future__ import annotations

import argparse
import os
import time

from distillery.tokenizer.tokenizer import STYLES


def register(subparsers) -> None:
    """Add `tokenizer` and its subcommands to the CLI."""
    from distillery.cli import add_command

    group = subparsers.add_parser("tokenizer", help="Train byte-level BPE tokenizers.",
                                  description="Train byte-level BPE tokenizers.")
    commands = group.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    p = add_command(commands, "train", train)
    p.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files to learn the merges from")
    p.add_argument("--vocab-size", type=int, required=True, help="number of ids, special tokens included")
    p.add_argument("--style", choices=STYLES, default="gpt2",
                   help="gpt2: <|endoftext|> (id 0); roberta: <s> <pad> </s> <unk> <mask> (ids 0-4)")
    p.add_argument("--out", required=True, help="folder to save the tokenizer files in")
    p.add_argument("--model-max-length", type=int, default=None,
                   help="longest input the model takes (default: 1024 for gpt2, 512 for roberta)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE tokenizer on FILES and save it to --out.

    The folder holds tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json, which distillery and transformers' AutoTokenizer both load.
    """
    from distillery.cli import print_json
    from distillery.tokenizer.training import train_tokenizer

    start = time.perf_counter()
    tokenizer = train_tokenizer(args.files, args.vocab_size, args.style, args.out,
                                model_max_length=args.model_max_length, show_progress=not args.json)
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
        print(f"Trained a {result['style']} tokenizer of {result['vocab_size']} ids on {result['files']} file(s) "
              f"({result['bytes'] / 1e6:.1f} MB) in {result['seconds']} s; saved to {result['out']}")
    return 0
