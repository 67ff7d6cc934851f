"""`distillery train`, `distillery distill` and `distillery demo`.

Every RunConfig setting is a flag (`--alpha-ce 5`) and a YAML key (`alpha_ce: 5`); flags win
over the file given with --config, which wins over the defaults. With --resume and no --config,
the run's own config.yaml is the base, so `distillery distill --out RUN --resume` continues a run.

A folder that already holds a run is refused unless --resume continues it or --overwrite replaces
it; an --overwrite run is written in `.RUN.overwrite` beside RUN (which --overwrite --resume
continues after a kill) and replaces RUN only when it finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillery.distill.chunked_losses import DEFAULT_CHUNK_SIZE
from distillery.distill.run_config import (
    COS_LAYERS,
    KD_LOSSES,
    OBJECTIVES,
    PRECISIONS,
    SCHEDULES,
    TEACHER_DTYPES,
    RunConfig,
    read_yaml,
)
from distillery.models.common import DistilleryError, plural

SHARED_SETTINGS = {
    "data": "folder written by `distillery prepare`",
    "out": "run folder (checkpoint, metrics, config.yaml, final model)",
    "tokenizer": "tokenizer folder (default: the model's, or the teacher's)",
    "seed": "random seed",
    "max_steps": "optimizer steps",
    "batch_size": "sequences per optimizer step, over all processes and accumulation steps",
    "seq_len": "tokens per sequence",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "warmup_steps": "steps of linear warm-up",
    "schedule": f"decay after warm-up: {', '.join(SCHEDULES)}",
    "weight_decay": "AdamW weight decay (never on biases and LayerNorms)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_eps": "AdamW epsilon",
    "grad_clip": "gradient norm clipping (0: off)",
    "precision": f"{', '.join(PRECISIONS)} (auto: bf16 on GPU, fp32 on CPU)",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "chunked_loss": "compute the vocabulary head and losses chunk by chunk: the same numbers, far less memory "
                    "(default: on; --no-chunked-loss for full logits)",
    "loss_chunk_size": f"positions per chunk of the chunked loss (default: {DEFAULT_CHUNK_SIZE})",
    "compile": "torch.compile the student's forward and backward; the first step compiles (default: off, "
               "no faster on a CPU)",
    "mlm_prob": "masked LM: fraction of tokens masked",
    "mlm_smoothing": "masked LM: masking weight count^-smoothing (0: uniform, as BERT/RoBERTa pre-training)",
    "eval_every": "steps between validation perplexities",
    "eval_batches": "validation batches per evaluation",
    "save_every": "steps between checkpoints",
    "log_every": "steps between metrics.jsonl records",
    "plot": "write loss.png",
    "carbon_region": "where the power came from, for CO2: provider:region (azure:eastus) or a country code",
}
DISTILL_SETTINGS = {
    "temperature": "softmax temperature of the soft targets",
    "alpha_ce": "weight of the soft-target loss",
    "alpha_lm": "weight of the hard LM loss",
    "alpha_cos": "weight of the hidden-state cosine loss",
    "alpha_mse": "weight of the logits MSE loss",
    "kd_loss": f"soft-target loss: {', '.join(KD_LOSSES)}",
    "beta": "gjsd: 0 is forward KL, 1 reverse KL",
    "cos_layers": f"{', '.join(COS_LAYERS)}: cosine on the last layer or every student layer",
    "kd_masked_only": "masked LM: soft targets only at masked positions",
    "teacher_dtype": f"{', '.join(TEACHER_DTYPES)}: the frozen teacher's weights (int8: CPUs only; bf16: for GPUs, "
                     "slow on CPUs without bf16 units; default: fp32)",
    "teacher_cache": "a folder made by `distillery teacher-cache`: distil from the teacher's stored top-k "
                     "(no --teacher; batches drawn from the cached windows)",
    "objective": "lm (logits and hidden states of language models) or embedding (sentence encoders, "
                 "data from `prepare --sentences`)",
    "alpha_emb": "embedding: weight of the MSE between pooled sentence embeddings",
    "alpha_attn": "embedding: weight of MiniLM's last-layer self-attention relation loss",
    "relation_heads": "embedding: heads the attention relations are split into",
    "eval_sts": "embedding: STS-B file scored (Spearman) at every evaluation",
}
CHOICES = {"schedule": SCHEDULES, "precision": PRECISIONS, "kd_loss": KD_LOSSES, "cos_layers": COS_LAYERS,
           "objective": OBJECTIVES, "teacher_dtype": TEACHER_DTYPES}
MODEL_SIZE_FLAGS = ("n_layer", "n_head", "n_embd", "n_positions")


def _setting_types() -> dict[str, Any]:
    """The command-line type (its range) of each setting; RunConfig checks them again, for YAML files.
    A setting not named here gets a finite number of its kind."""
    from distillery import cli_types as t

    below_one = t.float_range(0.0, 1.0, high_open=True)
    counts = ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
              "log_every", "relation_heads", "loss_chunk_size")
    weights = ("alpha_ce", "alpha_lm", "alpha_cos", "alpha_mse", "alpha_emb", "alpha_attn", "grad_clip",
               "mlm_smoothing")
    return {**dict.fromkeys(counts, t.positive_int), **dict.fromkeys(weights, t.non_negative_float),
            "seed": t.seed, "warmup_steps": t.non_negative_int, "lr": t.learning_rate, "adam_eps": t.positive_float,
            "weight_decay": t.probability,
            "temperature": t.positive_float, "min_lr_ratio": t.probability, "beta": t.probability,
            "adam_beta1": below_one, "adam_beta2": below_one, "mlm_prob": t.open_fraction,
            "device": t.device_or_auto, "data": t.existing_folder, "out": t.output_folder,
            "eval_sts": t.existing_file, "teacher_cache": t.existing_folder, "tokenizer": t.non_empty, "carbon_region": t.non_empty}


def register(subparsers) -> None:
    from distillery import cli_types
    from distillery.cli import add_command

    p = add_command(subparsers, "train", train_command)
    p.add_argument("--model", type=cli_types.non_empty,
                   help="checkpoint folder / hub id, or a preset (gpt2, distilgpt2, roberta-base, ...)")
    for name in MODEL_SIZE_FLAGS:
        p.add_argument(_flag(name), type=cli_types.positive_int, help=f"preset override: {name}")
    _add_run_flags(p, SHARED_SETTINGS)

    p = add_command(subparsers, "distill", distill_command)
    p.add_argument("--teacher", type=cli_types.non_empty, help="teacher model folder or hub id")
    p.add_argument("--student", type=cli_types.non_empty, help="student model folder (see `distillery student`)")
    p.add_argument("--layer-map", type=cli_types.non_empty,
                   help="teacher layer of each student layer for --cos-layers mapped, e.g. 0,2,4")
    _add_run_flags(p, {**SHARED_SETTINGS, **DISTILL_SETTINGS})

    p = add_command(subparsers, "demo", demo_command)
    p.add_argument("--out", default="runs/demo", type=cli_types.output_folder,
                   help="folder for everything the demo makes")
    _add_resume_flags(p, "demo")
    p.add_argument("--scale", type=cli_types.float_range(0.0, 100.0, low_open=True), default=1.0,
                   help="multiply the training steps by this and the model width by its square root "
                        "(2: a bigger, slower demo)")
    p.add_argument("--teacher-steps", type=cli_types.positive_int, help="teacher pre-training steps (default from --scale)")
    p.add_argument("--student-steps", type=cli_types.positive_int, help="distillation steps (default from --scale)")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="random seed")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_run_flags(p: argparse.ArgumentParser, settings: dict[str, str]) -> None:
    from distillery import cli_types

    p.add_argument("--config", type=cli_types.existing_file, help="YAML file of settings (flags override it)")
    _add_resume_flags(p, "run")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    types = {f.name: type(f.default) for f in dataclasses.fields(RunConfig)}
    ranges = _setting_types()
    fallback = {int: cli_types.int_range(-cli_types.MAX_COUNT), float: cli_types.finite_float}
    for name, help_text in settings.items():
        if types[name] is bool:
            p.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = ranges.get(name) or fallback.get(types[name], cli_types.text)
            p.add_argument(_flag(name), type=kind, choices=CHOICES.get(name), help=help_text)


def _add_resume_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--resume", action="store_true",
                   help=f"continue the {what} in --out from its last checkpoint (with --overwrite: the interrupted "
                        "replacement in .NAME.overwrite beside it)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace the {what} already in --out: the new one is written in .NAME.overwrite beside it "
                        "and replaces it only when it finishes, so a failure or Ctrl-C leaves the old one; "
                        "--overwrite --resume continues an interrupted one")


def _main_process() -> bool:
    """False in the other processes of a torchrun launch, which leave the run folder to the first."""
    return os.environ.get("RANK", "0") == "0"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_config(args: argparse.Namespace, kind: str, settings: dict[str, str], **extra: Any) -> RunConfig:
    """Defaults <- YAML (--config, or the run's config.yaml on --resume) <- flags."""
    from distillery.cli_types import overwrite_staging

    base: dict[str, Any] = {}
    folder = (overwrite_staging(args.out) if args.overwrite else Path(args.out)) if args.out else None
    if args.resume and folder and not any((folder / name).is_file() for name in ("config.yaml", "checkpoint.pt")):
        if args.overwrite:
            raise DistilleryError(f"There is no interrupted --overwrite run to resume in {folder}; drop --resume to "
                                  "start one.")
        raise DistilleryError(f"There is no run to resume in --out {args.out} (no config.yaml or checkpoint.pt); "
                              "check the folder, or drop --resume to start a run there.")
    if args.config:
        base = read_yaml(args.config)
        source = str(args.config)
    elif args.resume and folder and (folder / "config.yaml").is_file():
        base = read_yaml(folder / "config.yaml")
        source = str(folder / "config.yaml")
    else:
        source = "the flags"
    flags = {name: getattr(args, name) for name in settings if getattr(args, name) is not None}
    flags = {name: str(v) if isinstance(v, Path) else v for name, v in flags.items()}  # YAML keeps plain text
    values = {**base, "kind": kind, **flags, **{k: v for k, v in extra.items() if v is not None}}
    return RunConfig.from_dict(values, source=source)


@contextmanager
def run_folder(out: str | Path, args: argparse.Namespace, marker: str, what: str,
               inputs: Iterable[str | None] = ()) -> Iterator[Path]:
    """The folder a run (or the demo) is written in: --out itself for a new run or a plain --resume;
    with --overwrite the staging folder beside it, which replaces --out when the block ends normally.

    A new run is refused where --out already holds one (`marker`), and, as every output folder
    (`OutputFolder`), where --out is or holds an input or holds other files.
    """
    from distillery.cli_types import OutputFolder

    if args.resume and not args.overwrite:  # continued in place
        yield Path(out)
        return
    if not args.overwrite and (Path(out) / marker).is_file():
        raise DistilleryError(f"--out {out} already holds a {what}; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another folder.")
    target = OutputFolder(out, overwrite=args.overwrite, inputs=[i for i in inputs if i])
    if not args.overwrite:
        yield Path(out)
        return
    with target.staged_resumable(args.resume, main=_main_process()) as folder:
        yield folder


def _run_and_report(config: RunConfig, args: argparse.Namespace) -> int:
    from distillery.cli import print_json
    from distillery.distill.trainer import CHECKPOINT_NAME, run

    if not config.out:
        summary = run(config)  # which says that --out is needed
    else:
        inputs = (config.model, config.teacher, config.student, config.data, config.tokenizer, config.teacher_cache,
                  config.eval_sts)
        with run_folder(config.out, args, CHECKPOINT_NAME, "run", inputs) as folder:
            summary = run(config, resume=args.resume, folder=folder)
    if not summary.get("model"):  # not the main process of a multi-process run
        return 0
    if args.json:
        print_json(summary)
    elif summary.get("objective") == "embedding":
        sts = f", STS Spearman {summary['val_sts_spearman']:.2f}" if "val_sts_spearman" in summary else ""
        print(f"{plural(summary['steps'], 'step')}, {plural(summary['sentences'], 'sentence')}; validation embedding MSE "
              f"{summary['val_loss']:.3g}{sts}; model saved to {summary['model']}")
    else:
        print(f"{plural(summary['steps'], 'step')}, {plural(summary['tokens'], 'token')}; validation perplexity "
              f"{summary['val_ppl']:.2f}; model saved to {summary['model']}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    """Pre-train or fine-tune a causal (GPT-2) or masked (RoBERTa) language model.

    --model is a checkpoint to continue from, or a preset to start from scratch (sized with
    --n-layer, --n-head, --n-embd, --n-positions; a preset needs --tokenizer). Checkpoints go to
    --out every --save-every steps; --resume continues exactly. Launch with
    `torchrun --nproc_per_node N -m distillery.cli train ...` for several processes.
    """
    overrides = {name: getattr(args, name) for name in MODEL_SIZE_FLAGS if getattr(args, name) is not None}
    config = resolve_config(args, "train", SHARED_SETTINGS, model=args.model,
                            model_overrides=overrides or None)
    return _run_and_report(config, args)


def distill_command(args: argparse.Namespace) -> int:
    """Distil a teacher into a student: soft targets, hard LM loss and hidden-state alignment.

    loss = alpha_ce * KD(T) + alpha_lm * LM + alpha_cos * cosine + alpha_mse * MSE(logits), with
    KD one of forward_kl (DistilBERT's), reverse_kl or gjsd (--beta). Make the student with
    `distillery student TEACHER --out DIR`. Checkpoints go to --out every --save-every steps;
    --resume continues exactly. Launch with `torchrun --nproc_per_node N -m distillery.cli
    distill ...` for several processes.
    """
    layer_map = None
    if args.layer_map:
        from distillery.distill.student import parse_layers

        layer_map = parse_layers(args.layer_map, "--layer-map")
    config = resolve_config(args, "distill", {**SHARED_SETTINGS, **DISTILL_SETTINGS},
                            teacher=args.teacher, student=args.student, layer_map=layer_map)
    if layer_map is not None and config.cos_layers != "mapped":
        raise DistilleryError("--layer-map pairs layers for --cos-layers mapped only; add --cos-layers mapped or drop "
                              "--layer-map.")
    return _run_and_report(config, args)


def demo_command(args: argparse.Namespace) -> int:
    """Distil a code model end to end, offline, on the Python standard library's own source.

    Trains a BPE tokenizer, pre-trains a small GPT-2 teacher, makes a half-depth student,
    distils it, and compares both on held-out modules: perplexity, decoding tokens/s,
    parameters, and completions of a few prompts. Everything is left under --out, which a rerun
    replaces only with --overwrite (written beside it, swapped in at the end; --overwrite --resume
    continues an interrupted one); --resume continues an interrupted demo in place.
    """
    from distillery.cli import print_json
    from distillery.distill.demo import SETTINGS_NAME, DemoSettings, format_report, run_demo

    if args.scale <= 0:
        raise DistilleryError(f"--scale must be positive, got {args.scale}.")
    settings = DemoSettings.scaled(args.scale, out=args.out, seed=args.seed,
                                   teacher_steps=args.teacher_steps, student_steps=args.student_steps)
    with run_folder(args.out, args, SETTINGS_NAME, "demo") as folder:
        report = run_demo(settings, folder=folder, resume=args.resume)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0
