"""`distillery prepare` (tokenize a corpus into token shards) and `distillery student`."""

from __future__ import annotations

import argparse
from pathlib import Path

from distillery import cli_types
from distillery.cli import add_command, print_json
from distillery.models.common import DistilleryError, plural


def register(subparsers) -> None:
    p = add_command(subparsers, "prepare", prepare_command)
    p.add_argument("inputs", nargs="+", metavar="INPUT", type=cli_types.path_or_name,
                   help="text files, folders (searched recursively), .jsonl, .parquet or .arrow files, or "
                        "folders saved by Hugging Face datasets (save_to_disk)")
    p.add_argument("--tokenizer", metavar="TOK",
                   help="a model folder or tokenizer folder (tokenizer.json or vocab.json + merges.txt); "
                        "needed unless --sentences")
    p.add_argument("--out", required=True, type=cli_types.output_folder, metavar="DIR",
                   help="where train.bin, val.bin, meta.json go")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="file name patterns to take from folders (repeatable); default: every text file")
    p.add_argument("--text-field", default="text", type=cli_types.text,
                   help="the field (column) holding the text in .jsonl lines, parquet/arrow files and datasets")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=cli_types.open_fraction, default=None,
                       help="fraction of documents held out for validation (default 0.0005, at least one)")
    split.add_argument("--val-docs", type=cli_types.positive_int, default=None,
                       help="number of documents held out instead")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="seed of the train/validation split")
    p.add_argument("--overwrite", action="store_true", help="replace data already prepared in --out")
    sentences = p.add_argument_group("sentences (for embedding distillation: text kept, not tokenized)")
    sentences.add_argument("--sentences", action="store_true",
                           help="write train.txt / val.txt with one sentence per line instead of token files")
    sentences.add_argument("--split", choices=["sentences", "lines"], default="sentences",
                           help="cut paragraphs into sentences, or take each line as one (default: sentences)")
    sentences.add_argument("--val-sentences", type=cli_types.positive_int, default=1000,
                           help="sentences held out for validation (default: 1000)")
    sentences.add_argument("--min-words", type=cli_types.positive_int, default=4, help="shortest sentence kept, in words (default: 4)")
    sentences.add_argument("--max-chars", type=cli_types.positive_int, default=400,
                           help="longest sentence kept, in characters (default: 400)")
    sentences.add_argument("--max-sentences", type=cli_types.positive_int,
                           help="keep at most this many training sentences (default: all)")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")

    _register_teacher_cache(subparsers)

    p = add_command(subparsers, "student", student_command)
    p.add_argument("teacher", metavar="TEACHER", help="teacher model folder or hub id")
    p.add_argument("--layers", default=None, metavar="I,J,...",
                   help="teacher layers to keep, in order (default: one in two, e.g. 0,2,4,7,9,11 of 12)")
    p.add_argument("--out", required=True, type=cli_types.output_folder, metavar="DIR", help="folder for the student")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _register_teacher_cache(subparsers) -> None:
    from distillery.distill.run_config import DEFAULT_SEQ_LEN
    from distillery.distill.teacher_cache import DEFAULT_SHARD_WINDOWS, LOGPROB_DTYPES

    p = add_command(subparsers, "teacher-cache", teacher_cache_command)
    p.add_argument("teacher", metavar="TEACHER", type=cli_types.path_or_name, help="causal LM teacher folder or hub id")
    p.add_argument("--data", required=True, type=cli_types.existing_folder, metavar="DIR",
                   help="folder written by `distillery prepare` (its train split is cached)")
    p.add_argument("--out", required=True, type=cli_types.output_folder, metavar="CACHE", help="folder for the cache")
    p.add_argument("--top-k", type=cli_types.positive_int, default=64,
                   help="token ids (and log-probabilities) kept per position (default: 64)")
    p.add_argument("--seq-len", type=cli_types.positive_int,
                   help=f"tokens per window; distill must use the same (default: {DEFAULT_SEQ_LEN}, or the teacher's "
                        "positions)")
    p.add_argument("--hidden", action="store_true",
                   help="also keep the last hidden states, for the cosine loss (2 x width bytes per token)")
    p.add_argument("--logprob-dtype", choices=LOGPROB_DTYPES, default="float16",
                   help="how the log-probabilities are stored (default: float16)")
    p.add_argument("--windows", type=cli_types.positive_int, help="cache only the first N windows (default: all)")
    p.add_argument("--batch-size", type=cli_types.positive_int, default=8,
                   help="windows per teacher forward (default: 8)")
    p.add_argument("--shard-windows", type=cli_types.positive_int, default=DEFAULT_SHARD_WINDOWS,
                   help=f"windows per shard file (default: {DEFAULT_SHARD_WINDOWS})")
    p.add_argument("--device", type=cli_types.device_or_auto, default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache of other settings in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def teacher_cache_command(args: argparse.Namespace) -> int:
    """Run a causal LM teacher once over prepared data and store its top-k next-token log-probabilities.

    Writes CACHE/meta.json and memory-mapped shards holding, per position of every training window,
    the --top-k most likely ids, their log-probabilities and the log of the mass left outside them
    (and with --hidden the last hidden states). A rerun with the same settings resumes an interrupted
    build. `distillery distill --teacher-cache CACHE --student S ...` then trains without the
    teacher. Launch with `torchrun --nproc_per_node N -m distillery.cli teacher-cache ...` to
    split the shards over processes.
    """
    from distillery.distill.teacher_cache import build_cache

    summary = build_cache(args.teacher, args.data, args.out, args.top_k, seq_len=args.seq_len, hidden=args.hidden,
                          logprob_dtype=args.logprob_dtype, windows=args.windows, batch_size=args.batch_size,
                          shard_windows=args.shard_windows, device=args.device, overwrite=args.overwrite)
    if not summary.pop("is_main"):
        return 0
    if args.json:
        print_json(summary)
    else:
        print(f"{plural(summary['windows'], 'window')} ({plural(summary['tokens'], 'token')}) in "
              f"{plural(summary['shards'], 'shard')}, "
              f"{summary['bytes_per_token']} bytes per token ({summary['bytes'] / 1e6:,.1f} MB); cache in "
              f"{summary['cache']}")
    return 0


def prepare_command(args: argparse.Namespace) -> int:
    """Tokenize a corpus into memory-mapped token files for training and distillation.

    Reads text files, folders (recursively), .jsonl, .parquet and .arrow files and folders saved by
    Hugging Face datasets one document at a time, tokenizes them in batches on all cores, and
    writes DIR/train.bin and DIR/val.bin (documents separated by the end-of-text token),
    DIR/meta.json, DIR/token_counts.npy and a copy of the tokenizer. Validation holds out whole
    documents; a corpus of one document (one text file) holds out the tail of it.
    """
    from distillery.distill.data import DEFAULT_VAL_FRACTION, prepare_corpus
    from distillery.distill.run_config import DEFAULT_SEQ_LEN
    from distillery.tokenizer import load_tokenizer

    if args.sentences:
        return _prepare_sentences(args)
    if not args.tokenizer:
        raise DistilleryError("prepare needs --tokenizer (a model or tokenizer folder), or --sentences for "
                              "sentence data.")
    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare_corpus(
        args.inputs, tokenizer, args.out, include=args.include, text_field=args.text_field,
        val_fraction=DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        val_docs=args.val_docs, seed=args.seed, overwrite=args.overwrite,
    )
    if args.json:
        print_json(meta)
        return 0
    counts = meta["counts"]
    print(f"prepared {plural(counts['documents'], 'document')} from {plural(counts['files'], 'file')} into {args.out}")
    print(f"  train: {plural(counts['train_tokens'], 'token')} in {plural(counts['train_documents'], 'document')}")
    if meta["val_split"] == "tail":
        print(f"  val:   {plural(counts['val_tokens'], 'token')}, the end of the one document (a corpus of one document "
              "holds out its tail)")
    else:
        print(f"  val:   {plural(counts['val_tokens'], 'token')} in {plural(counts['val_documents'], 'document')}")
    window = DEFAULT_SEQ_LEN + 1
    if counts["val_tokens"] < window:
        print(f"  note: the validation split holds fewer than {window:,} tokens, one window of the default "
              "--seq-len; hold out more with --val-fraction or --val-docs, or train with a lower --seq-len")
    if counts["invalid_utf8_documents"]:
        print(f"  {counts['invalid_utf8_documents']:,} document(s) held invalid UTF-8, replaced by U+FFFD")
    if counts["skipped_records"]:
        print(f"  {counts['skipped_records']:,} record(s) without a {args.text_field!r} string were skipped")
    return 0


def student_command(args: argparse.Namespace) -> int:
    """Make a half-depth student from a teacher: embeddings, chosen blocks, final norm and heads.

    A sentence-transformers teacher gives a sentence-transformers student with the same pooling
    and normalisation.

    By default keeps one teacher layer in two, first and last included, as DistilBERT,
    DistilGPT2 and DistilRoBERTa did (12 layers -> 0,2,4,7,9,11). The student is saved in
    Hugging Face layout with the teacher's tokenizer.
    """
    from distillery.cli_types import OutputFolder
    from distillery.distill.student import make_student, parse_layers
    from distillery.models import load_model
    from distillery.models.checkpoint import resolve_model_dir
    from distillery.models.sentence_encoder import (
        SentenceEncoder,
        is_sentence_transformers_folder,
        load_sentence_encoder,
    )

    layers = parse_layers(args.layers) if args.layers is not None else None
    teacher_dir = resolve_model_dir(args.teacher)
    out = Path(args.out)
    if out.resolve() == teacher_dir.resolve():
        raise DistilleryError(f"--out {out} is the teacher's folder; choose another folder for the student.")
    target = OutputFolder(out, overwrite=args.overwrite, inputs=[teacher_dir])
    if is_sentence_transformers_folder(teacher_dir):
        # A sentence encoder's student keeps its pooling, normalisation and sequence length.
        encoder = load_sentence_encoder(teacher_dir)
        teacher = encoder.model
        student = make_student(teacher, layers)
        with target.staged() as folder:
            SentenceEncoder(student, encoder.tokenizer, encoder.pooling, encoder.normalize, encoder.max_seq_length,
                            encoder.do_lower_case).save_pretrained(folder)
        tokenizer_copied = True
    else:
        teacher = load_model(teacher_dir)
        student = make_student(teacher, layers)
        with target.staged() as folder:
            student.save_pretrained(folder)
            tokenizer_copied = _copy_tokenizer(teacher_dir, folder)
    summary = {
        "teacher": str(args.teacher),
        "out": str(out),
        "family": teacher.family,
        "task": teacher.task,
        "teacher_layers": teacher.config.num_layers,
        "layers": student.config.extra["teacher_layers"],
        "teacher_parameters": teacher.num_parameters(),
        "student_parameters": student.num_parameters(),
        "tokenizer_copied": tokenizer_copied,
    }
    if args.json:
        print_json(summary)
        return 0
    print(f"student of {args.teacher}: teacher layers {summary['layers']} of {summary['teacher_layers']}")
    print(f"  parameters: {summary['student_parameters']:,} (teacher {summary['teacher_parameters']:,})")
    print(f"  saved to {out}" + ("" if tokenizer_copied else " (the teacher folder has no tokenizer to copy)"))
    return 0


def _copy_tokenizer(teacher_dir: Path, out: Path) -> bool:
    # tokenizer.json, or what rebuilds one: vocab.json + merges.txt (BPE), vocab.txt (WordPiece).
    if not any((teacher_dir / name).is_file() for name in ("tokenizer.json", "vocab.json", "vocab.txt")):
        return False
    from distillery.tokenizer import load_tokenizer

    load_tokenizer(teacher_dir).save_pretrained(out)
    return True


def _prepare_sentences(args: argparse.Namespace) -> int:
    from distillery.distill.sentences import prepare_sentences

    if args.max_sentences is not None and args.max_sentences <= 0:
        raise DistilleryError(f"--max-sentences must be a positive integer, got {args.max_sentences}.")
    meta = prepare_sentences(args.inputs, args.out, split=args.split, include=args.include, text_field=args.text_field,
                             val_sentences=args.val_sentences, min_words=args.min_words, max_chars=args.max_chars,
                             max_sentences=args.max_sentences, seed=args.seed, overwrite=args.overwrite)
    if args.json:
        print_json(meta)
        return 0
    counts = meta["counts"]
    print(f"prepared {counts['train']:,} training and {plural(counts['val'], 'validation sentence')} from "
          f"{plural(meta['files'], 'file')} into {args.out}")
    return 0
