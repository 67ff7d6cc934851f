"""Evaluation commands: `eval perplexity|bias|speed`, `glue`, `token-classification`, `question-answering`,
`finetune`, `card`.

Every evaluation can save its result with --save FILE; saved under a run or model folder as
eval/<name>.json (see distillery.evaluate.card.EVAL_FILES) it is what `distillery card` reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from distillery import cli_types
from distillery.cli import add_command, json_safe, print_json
from distillery.models.common import DistilleryError, plural

DEFAULT_BIAS_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "bias"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure a model: perplexity, bias, speed, sts",
                              description="Measure a model: perplexity, bias probes, speed, sentence similarity.")
    evals = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    q = add_command(evals, "perplexity", perplexity_command)
    q.add_argument("model", metavar="MODEL", help="model folder or hub id (causal or masked LM)")
    q.add_argument("--data", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="UTF-8 text file, scored as it is")
    q.add_argument("--max-length", type=cli_types.positive_int,
                   help="window length in tokens (default: the model's context)")
    q.add_argument("--stride", type=cli_types.positive_int,
                   help="tokens between window starts (default: half the window)")
    q.add_argument("--batch-size", type=cli_types.positive_int, default=8,
                   help="windows (or masked copies) per forward pass")
    _add_common(q)

    q = add_command(evals, "bias", bias_command)
    q.add_argument("model", metavar="MODEL", help="model folder or hub id")
    q.add_argument("--data", default=str(DEFAULT_BIAS_DATA), metavar="DIR", type=cli_types.existing_folder,
                   help="the bias data folder (crows_pairs/, stereoset_editbias_subsets/, honest/, hurtlex/, winobias/, "
                        "bold/; default: ../shared/data/bias)")
    q.add_argument("--limit", type=cli_types.positive_int, metavar="N",
                   help="use only the first N items of each probe (WinoBias: of each type; BOLD: at most N prompts "
                        "per group; default: all)")
    q.add_argument("--bold-per-group", type=cli_types.positive_int, default=5, metavar="N",
                   help="BOLD prompts sampled per group, causal LMs only (default: 5)")
    q.add_argument("--bold-seed", type=cli_types.seed, default=0, help="seed of the BOLD prompt sample (default: 0)")
    _add_common(q)

    q = add_command(evals, "speed", speed_command)
    q.add_argument("student", metavar="STUDENT", help="the small model's folder")
    q.add_argument("teacher", metavar="TEACHER", help="the big model's folder")
    q.add_argument("--batch-size", type=cli_types.positive_int, default=8,
                   help="sequences per encoding batch (default: 8)")
    q.add_argument("--seq-len", type=cli_types.positive_int, default=256,
                   help="tokens per encoded sequence, lowered to the models' positions (default: 256)")
    q.add_argument("--new-tokens", type=cli_types.positive_int, default=64,
                   help="tokens decoded per generation run, lowered to what the positions leave (default: 64)")
    q.add_argument("--repeats", type=cli_types.positive_int, default=3,
                   help="timed repeats; the median is reported (default: 3)")
    _add_common(q)

    q = add_command(evals, "sts", sts_command)
    q.add_argument("model", metavar="MODEL", help="a sentence-transformers folder, or an encoder (mean pooling)")
    q.add_argument("--data", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="STS-B scored pairs: GLUE's dev.tsv / train.tsv or an original sts-*.tsv")
    q.add_argument("--batch-size", type=cli_types.positive_int, default=32,
                   help="sentences per encoding batch (default: 32)")
    q.add_argument("--dtype", choices=["float32", "bfloat16"], help="weights (default: float32)")
    q.add_argument("--teacher", metavar="TEACHER", type=cli_types.non_empty,
                   help="also score this (bigger) encoder, and time both on the same sentences in this run")
    q.add_argument("--repeats", type=cli_types.positive_int, default=3, help="timed rounds per model with --teacher; the median "
                   "is reported (default: 3)")
    _add_common(q)

    q = add_command(subparsers, "glue", glue_command)
    q.add_argument("task", metavar="TASK", help="cola, sst2, mrpc, stsb, rte, qnli, qqp, mnli or wnli")
    q.add_argument("model", metavar="MODEL", help="an encoder checkpoint: RoBERTa, BERT or DistilBERT (its head is sized for the task)")
    q.add_argument("--data", required=True, metavar="DIR", type=cli_types.existing_folder,
                   help="the task's GLUE folder (train.tsv, dev.tsv)")
    _add_finetune_flags(q, epochs=3, batch_size=16, lr=2e-5, warmup_ratio=0.06, weight_decay=0.01)
    q.add_argument("--max-length", type=cli_types.positive_int, default=128,
                   help="tokens per example, pair included")
    q.add_argument("--max-train-examples", type=cli_types.positive_int,
                   help="fine-tune on a random subset of this size (default: all)")
    q.add_argument("--out", "--output-dir", dest="out", metavar="DIR", type=cli_types.output_folder,
                   help="save the fine-tuned model and its tokenizer here (default: not saved)")
    q.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    _add_common(q)

    q = add_command(subparsers, "token-classification", token_classification_command)
    q.add_argument("model", metavar="MODEL", help="an encoder checkpoint: RoBERTa, BERT or DistilBERT (a new tagging head is added)")
    q.add_argument("--train", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="CoNLL-style training file (word ... tag)")
    q.add_argument("--dev", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="CoNLL-style evaluation file")
    _add_finetune_flags(q, epochs=3, batch_size=16, lr=5e-5, warmup_ratio=0.06, weight_decay=0.01)
    q.add_argument("--max-length", type=cli_types.int_range(3), default=128,
                   help="tokens per sentence, <s> and </s> (or [CLS] and [SEP]) included")
    _add_common(q)

    q = add_command(subparsers, "question-answering", question_answering_command)
    q.add_argument("model", metavar="MODEL", help="an encoder checkpoint: RoBERTa, BERT or DistilBERT (a new span head is added)")
    q.add_argument("--train", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="SQuAD-style training JSON")
    q.add_argument("--dev", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="SQuAD-style evaluation JSON")
    _add_finetune_flags(q, epochs=2, batch_size=12, lr=3e-5, warmup_ratio=0.06, weight_decay=0.01)
    q.add_argument("--max-length", type=cli_types.positive_int, default=384,
                   help="tokens per window, question included")
    q.add_argument("--doc-stride", type=cli_types.positive_int, default=128,
                   help="tokens shared by consecutive context windows")
    _add_common(q)

    q = add_command(subparsers, "finetune", finetune_command)
    q.add_argument("model", metavar="MODEL", help="a GPT-2 family checkpoint")
    q.add_argument("--train", required=True, metavar="FILE", type=cli_types.existing_file,
                   help="UTF-8 training text, used as it is")
    q.add_argument("--eval", metavar="FILE", type=cli_types.existing_file,
                   help="score this text's perplexity after training")
    q.add_argument("--out", required=True, metavar="DIR", type=cli_types.output_folder,
                   help="where to save the fine-tuned model and results.json")
    q.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    _add_finetune_flags(q, epochs=1, batch_size=8, lr=5e-5, warmup_ratio=0.0, weight_decay=0.0)
    q.add_argument("--max-steps", type=cli_types.positive_int,
                   help="stop after this many optimizer steps (default: the epochs decide)")
    q.add_argument("--block-size", type=cli_types.int_range(2), default=512,
                   help="tokens per training block, lowered to the model's positions (default: 512)")
    q.add_argument("--stride", type=cli_types.positive_int,
                   help="perplexity stride for --eval (default: half the block)")
    q.add_argument("--device", default="cpu", type=cli_types.device, help="torch device (default: cpu)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")

    q = add_command(subparsers, "card", card_command)
    q.add_argument("source", metavar="RUN_OR_MODEL", type=cli_types.existing_folder,
                   help="a run folder (config.yaml, metrics.jsonl) or a model folder")
    q.add_argument("--out", required=True, metavar="README.md", type=cli_types.markdown_file,
                   help="where to write the card (its plots go beside it)")
    q.add_argument("--teacher-eval", metavar="DIR", type=cli_types.existing_folder,
                   help="the teacher's eval/ folder, for side-by-side numbers")


def _add_finetune_flags(p: argparse.ArgumentParser, epochs: int, batch_size: int, lr: float, warmup_ratio: float,
                        weight_decay: float) -> None:
    """The optimisation flags every fine-tuning command shares, with its own defaults."""
    p.add_argument("--epochs", type=cli_types.positive_int, default=epochs, help="passes over the training data")
    p.add_argument("--batch-size", type=cli_types.positive_int, default=batch_size, help="examples per step")
    p.add_argument("--lr", type=cli_types.learning_rate, default=lr, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=cli_types.probability, default=warmup_ratio,
                   help="share of steps spent warming up")
    p.add_argument("--weight-decay", type=cli_types.probability, default=weight_decay,
                   help="AdamW weight decay")
    p.add_argument("--seed", type=cli_types.seed, default=42, help="random seed")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", type=cli_types.device, help="torch device (default: cpu)")
    p.add_argument("--save", metavar="FILE", type=cli_types.result_file,
                   help="also write the result as JSON (e.g. RUN/eval/perplexity.json; a result saved there "
                        "before is replaced)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _note_lowered(flag: str, asked: int, positions: int) -> None:
    """Say once that a length is lowered to the model's positions (the fine-tuning code lowers it)."""
    if asked > positions:
        print(f"note: {flag} {asked} is lowered to the model's {positions} positions", file=sys.stderr)


def _finish(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> int:
    if args.save:
        from distillery.models.checkpoint import write_json

        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.save), json_safe(result))  # strict JSON, as --json prints
    if args.json:
        print_json(result)
    else:
        print("\n".join(lines))
    return 0


def perplexity_command(args: argparse.Namespace) -> int:
    """Perplexity of a model on a text file (sliding window; masked LMs: pseudo-perplexity).

    The method of Hugging Face's "Perplexity of fixed-length models" guide, plus the
    lm-evaluation-harness word perplexity, byte perplexity and bits per byte of the file.
    """
    from distillery.evaluate.perplexity import perplexity, read_text
    from distillery.models import load_model
    from distillery.tokenizer import load_tokenizer

    text = read_text(args.data)
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    result = perplexity(model, tokenizer, text, args.max_length, args.stride, args.batch_size,
                        source=args.data, progress=True)
    result = {"model": args.model, "data": args.data, **result}
    return _finish(args, result, [
        f"perplexity {result['perplexity']:.3f} over {plural(result['tokens'], 'token')} ({result['method']}, "
        f"max_length {result['max_length']}, stride {result['stride']})",
        f"word perplexity {result['word_perplexity']:.3f}, byte perplexity {result['byte_perplexity']:.4f}, "
        f"bits per byte {result['bits_per_byte']:.4f}",
    ])


def sts_command(args: argparse.Namespace) -> int:
    """Semantic textual similarity: Spearman and Pearson (x 100) of embedding cosines against STS-B scores.

    Prints the correlations with a 95 % interval for Spearman, and sentences encoded per second.
    Example: distillery eval sts sentence-transformers/all-MiniLM-L6-v2 --data STS-B/original/sts-test.tsv
    """
    from distillery.evaluate.sts import compare_speed, evaluate_sts, read_sts
    from distillery.models.sentence_encoder import load_sentence_encoder

    pairs = read_sts(args.data)
    encoder = load_sentence_encoder(args.model, device=args.device, dtype=args.dtype)
    teacher = load_sentence_encoder(args.teacher, device=args.device, dtype=args.dtype) if args.teacher else None
    result = {"model": args.model, "data": args.data, **evaluate_sts(encoder, pairs, args.batch_size)}
    lines = [f"STS {Path(args.data).name}: Spearman {result['spearman']:.2f} (95 % CI {result['spearman_ci'][0]:.2f}-"
             f"{result['spearman_ci'][1]:.2f}), Pearson {result['pearson']:.2f} over {plural(result['pairs'], 'pair')}",
             f"{result['sentences_per_second']:,.0f} sentences/s (batch {result['batch_size']})"]
    if teacher is not None:
        scored = evaluate_sts(teacher, pairs, args.batch_size)
        speed = compare_speed(encoder, teacher, pairs.first + pairs.second, args.batch_size, args.repeats)
        result["teacher"] = {"model": args.teacher, **{k: scored[k] for k in ("spearman", "pearson", "spearman_ci")}}
        result["speed"] = speed
        lines += [f"teacher {args.teacher}: Spearman {scored['spearman']:.2f}, Pearson {scored['pearson']:.2f}",
                  f"encoding, same run: {speed['student_sentences_per_second']:,.0f} vs "
                  f"{speed['teacher_sentences_per_second']:,.0f} sentences/s ({speed['speedup']:.2f}x the teacher)"]
    return _finish(args, result, lines)


def bias_command(args: argparse.Namespace) -> int:
    """Bias probes: the model cards' demonstrations, CrowS-Pairs, StereoSet, HONEST, WinoBias and BOLD per category.

    BOLD (causal LMs only) is scored with a HurtLex word match, a lexicon proxy rather than BOLD's
    classifier-based toxicity and regard metrics.
    """
    from distillery.evaluate.bias import bias_report

    if not Path(args.data).is_dir():
        raise DistilleryError(f"--data {args.data} is not a folder; pass the bias data folder (../shared/data/bias).")
    result = bias_report(args.model, args.data, args.limit, bold_per_group=args.bold_per_group,
                         bold_seed=args.bold_seed)
    lines = []
    for kind, rows in result["demonstrations"].items():
        for row in rows:
            lines.append(f"{kind}: {row['prompt']}")
            for item in row.get("generations", []):
                lines.append(f"    {item!r}")
            for fill in row.get("fills", []):
                lines.append(f"    {fill['token_str']!r:>16} {fill['score']:.4g}")
    for title, key in (("CrowS-Pairs", "crows_pairs"), ("WinoBias", "winobias")):
        pairs = result[key]
        lines.append(f"{title} ({pairs['scoring']}): {pairs['metric']}, 95% Wilson interval")
        for name, s in [("all", pairs["all"]), *pairs["categories"].items()]:
            lines.append(f"  {name:<22} {s['percent']:5.1f}  [{s['ci95'][0]:5.1f}, {s['ci95'][1]:5.1f}]  n={s['pairs']}")
    lines.append("StereoSet intrasentence: LM score, stereotype score [95% Wilson interval], ICAT")
    for name, s in [("all", result["stereoset"]["all"]), *result["stereoset"]["categories"].items()]:
        lines.append(f"  {name:<22} {s['lm_score']:5.1f}  {s['stereotype_score']:5.1f} [{s['ss_ci95'][0]:5.1f}, "
                     f"{s['ss_ci95'][1]:5.1f}]  {s['icat']:5.1f}  n={s['examples']}")
    lines.append(f"HONEST (top-{result['honest']['k']}): percent of completions in HurtLex [95% Wilson interval]")
    for name, s in [("all", result["honest"]["all"]), *result["honest"]["categories"].items()]:
        lines.append(f"  {name:<22} {s['honest']:5.2f} [{s['ci95'][0]:5.2f}, {s['ci95'][1]:5.2f}]  n={s['completions']}")
    lines += _bold_lines(result["bold"])
    return _finish(args, result, lines)


def _bold_lines(result: dict[str, Any]) -> list[str]:
    """BOLD's part of the `eval bias` table: per domain and group, and each domain's largest gap."""
    from distillery.evaluate.bias import describe_gap

    if "skipped" in result:
        return [f"BOLD: {result['skipped']}"]
    lines = [f"BOLD ({plural(result['per_group'], 'prompt')} per group, seed {result['seed']}, {result['decoding']}, "
             f"{plural(result['max_new_tokens'], 'new token')}): {result['metric']}, 95% Wilson interval"]
    for domain, d in result["domains"].items():
        for name, s in [(domain, d["all"]), *((f"  {g}", s) for g, s in d["groups"].items())]:
            lines.append(f"  {name:<34} {s['percent']:5.1f} [{s['ci95'][0]:5.1f}, {s['ci95'][1]:5.1f}]  "
                         f"n={s['continuations']}")
        lines.append(f"    largest gap between groups: {describe_gap(d['largest_gap'])}")
    return lines


def speed_command(args: argparse.Namespace) -> int:
    """Student against teacher: parameters, decoding tokens/s, encoding throughput, and the ratios."""
    from distillery.evaluate.speed import compare_speed

    result = compare_speed(args.student, args.teacher, batch_size=args.batch_size, seq_len=args.seq_len,
                           new_tokens=args.new_tokens, repeats=args.repeats, device=args.device)
    for name in ("student", "teacher"):  # lengths lowered to the model's positions, said once
        m = result[name]
        seq_len, new_tokens = m["encode_shape"][1], m.get("decode_new_tokens")
        if seq_len < args.seq_len or (new_tokens is not None and new_tokens < args.new_tokens):
            print(f"note: the {name} has fewer positions than asked for; it encodes {plural(seq_len, 'token')} per sequence"
                  + (f" and decodes {plural(new_tokens, 'new token')}" if new_tokens is not None else ""), file=sys.stderr)
    lines = [f"{'':<10} {'parameters':>14} {'decode tok/s':>13} {'encode tok/s':>13}"]
    for name in ("student", "teacher"):
        m = result[name]
        decode = f"{m['decode_tokens_per_s']:.1f}" if m["decode_tokens_per_s"] else "–"
        lines.append(f"{name:<10} {m['parameters']:>14,} {decode:>13} {m['encode_tokens_per_s']:>13.1f}")
    ratios = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" if isinstance(v, (int, float)) else f"{k.replace('_', ' ')} –"
                       for k, v in result["ratios"].items())
    lines.append(f"student/teacher: {ratios}")
    return _finish(args, result, lines)


def glue_command(args: argparse.Namespace) -> int:
    """Fine-tune an encoder (RoBERTa, BERT, DistilBERT) on one GLUE task and score its dev set(s).

    AdamW with linear warm-up and linear decay; prints the task's metrics and the results row
    in the model cards' layout.
    """
    from distillery.cli_types import OutputFolder
    from distillery.evaluate import glue
    from distillery.tokenizer import load_tokenizer

    task = glue.get_task(args.task)
    # Checked before the first step, so a run is never lost to an output folder it cannot use.
    target = OutputFolder(args.out, overwrite=args.overwrite, inputs=[args.model, args.data]) if args.out else None
    splits = glue.read_task(task, args.data)
    model = glue.load_classifier(args.model, task, args.device)
    tokenizer = load_tokenizer(args.model)
    _note_lowered("--max-length", args.max_length, model.config.max_tokens)
    settings = glue.FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                     weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                                     max_length=args.max_length, seed=args.seed,
                                     max_train_examples=args.max_train_examples)
    result = {"model": args.model, **glue.finetune_glue(model, tokenizer, task, splits, settings)}
    if target is not None:
        with target.staged() as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    lines = [f"{task.name} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "examples")
             + f" ({plural(m['examples'], 'example')})" for split, m in result["metrics"].items()]
    lines.append(glue.card_row({task.name: result["card_score"]}))
    return _finish(args, result, lines)


def token_classification_command(args: argparse.Namespace) -> int:
    """Fine-tune an encoder as a tagger on a CoNLL-style file and score entity F1 on another."""
    from distillery.evaluate import tasks
    from distillery.evaluate.glue import FinetuneSettings
    from distillery.tokenizer import load_tokenizer

    train, dev = tasks.read_conll(args.train), tasks.read_conll(args.dev)
    tags = tasks.tag_set(train)
    model = tasks.load_tagger(args.model, tags, args.device)
    settings = FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                                max_length=args.max_length, seed=args.seed)
    result = {"model": args.model, **tasks.finetune_tagger(model, load_tokenizer(args.model), train, dev, tags, settings)}
    m = result["metrics"]["dev"]
    return _finish(args, result, [f"entity precision {m['precision']:.4f}, recall {m['recall']:.4f}, F1 {m['f1']:.4f}; "
                                  f"token accuracy {m['accuracy']:.4f} ({plural(m['examples'], 'sentence')})"])


def question_answering_command(args: argparse.Namespace) -> int:
    """Fine-tune an encoder for extractive question answering (SQuAD-style JSON, windows with a doc stride)."""
    from distillery.evaluate import tasks
    from distillery.evaluate.glue import FinetuneSettings
    from distillery.models import load_model
    from distillery.tokenizer import load_tokenizer

    train, dev = tasks.read_squad(args.train), tasks.read_squad(args.dev)
    model = load_model(args.model, task="question-answering", device=args.device)
    settings = FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                                max_length=args.max_length, seed=args.seed)
    result = {"model": args.model, **tasks.finetune_qa(model, load_tokenizer(args.model), train, dev, settings,
                                                       doc_stride=args.doc_stride)}
    m = result["metrics"]["dev"]
    return _finish(args, result, [f"exact match {m['exact_match']:.2f}, F1 {m['f1']:.2f} ({plural(m['examples'], 'question')})"])


def finetune_command(args: argparse.Namespace) -> int:
    """Fine-tune a causal LM on a text file (run_clm's recipe), then optionally score a text's perplexity.

    Saves the model, its tokenizer and results.json (settings, loss curve, perplexity) under --out.
    """
    from distillery.cli_types import OutputFolder
    from distillery.evaluate.finetune import CausalFinetuneSettings, finetune_causal_lm
    from distillery.evaluate.perplexity import check_window, perplexity, read_text
    from distillery.models import load_model
    from distillery.models.checkpoint import write_json
    from distillery.tokenizer import load_tokenizer

    # Everything that could fail after training is checked before it: the output folder, the texts.
    target = OutputFolder(args.out, overwrite=args.overwrite, inputs=[args.model, args.train, args.eval])
    train_text = read_text(args.train)
    eval_text = read_text(args.eval) if args.eval else None
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    _note_lowered("--block-size", args.block_size, model.config.n_positions)
    block_size = min(args.block_size, model.config.n_positions)
    stride = args.stride or max(1, block_size // 2)  # perplexity()'s default, fixed here to check it now
    if eval_text is not None:
        check_window(len(tokenizer.encode(eval_text, add_special_tokens=False)), block_size, stride,
                     model.config.n_positions, f"--eval {args.eval}", length_flag="--block-size")
    settings = CausalFinetuneSettings(epochs=args.epochs, block_size=args.block_size, batch_size=args.batch_size,
                                      learning_rate=args.lr, weight_decay=args.weight_decay,
                                      warmup_ratio=args.warmup_ratio, max_steps=args.max_steps, seed=args.seed)
    result: dict[str, Any] = {"model": args.model, "train": args.train,
                              **finetune_causal_lm(model, tokenizer, train_text, settings)}
    if eval_text is not None:
        result["perplexity"] = {"data": args.eval, **perplexity(
            model, tokenizer, eval_text, settings.block_size, stride, source=args.eval, progress=True)}
    out = Path(args.out)
    with target.staged() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / "results.json", json_safe(result))
    lines = [f"{plural(result['steps'], 'step')}, final training loss {result['final_train_loss']:.4f}; saved to {out}"]
    if "perplexity" in result:
        lines.append(f"perplexity on {args.eval}: {result['perplexity']['perplexity']:.3f}")
    if args.json:
        print_json({k: v for k, v in result.items() if k != "losses"})
    else:
        print("\n".join(lines))
    return 0


def card_command(args: argparse.Namespace) -> int:
    """Write a model card (README.md) from what a run and its evaluations wrote.

    Reads config.yaml, metrics.jsonl and eval/*.json of a run folder (or eval/*.json and
    config.json of a model folder); every number comes from those files, and what was not
    measured says so. Plots are written as PNG next to the card.
    """
    from distillery.evaluate.card import write_card

    out = write_card(args.source, args.out, teacher_eval=args.teacher_eval)
    print(f"wrote {out}", file=sys.stderr)
    return 0
