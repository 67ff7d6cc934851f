"""`distillery demo`: the whole distillation job, offline, on the Python standard library's source.

Every machine with Python has a few megabytes of well-written code in its standard library, found
through `sysconfig`; nothing is downloaded. The demo trains a byte-level BPE tokenizer on it,
tokenizes it (some modules held out), pre-trains a small GPT-2 teacher, makes a half-depth student
from the teacher's layers, distils it, and compares the two on the held-out modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillery.distill.run_config import RunConfig
from distillery.models.common import DistilleryError, plural

# Folders of the standard library that are not its ordinary code: the test suite (large and
# repetitive), installed third-party packages, code kept for old tools, and generated tables
# (encodings/ is 14 % of the rest, all codec maps, which a small model learns to parrot at the
# expense of ordinary code).
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                   "__pycache__", "ensurepip", "config-3", "pydoc_data", "encodings"}
# Prompts end inside a token, not on a space: byte-level BPE puts the space in front of the next word.
PROMPTS = ("def read_file(path", "class Config(", "import os\nfrom ", "    for i in range(")
# The demo's settings, written first: they mark a folder as a demo's, and --resume must match them.
SETTINGS_NAME = "demo.json"


@dataclass
class DemoSettings:
    """Sizes of the demo; `scaled` grows width, steps and data together."""

    out: str = "runs/demo"
    seed: int = 0
    vocab_size: int = 4096
    n_embd: int = 128
    n_head: int = 4
    teacher_layers: int = 4
    seq_len: int = 128
    batch_size: int = 16
    # Most of the budget goes to the teacher: an undertrained teacher is beaten by its own student
    # given many extra steps (at 240 + 60 steps and half this width the student won, 88 vs 97
    # perplexity), and then the comparison says little about distillation. A student made from
    # the teacher's layers needs only tens of steps to recover from losing half of them. At 650 +
    # 100 steps the two were still even (64.5 vs 63.8 validation perplexity); these sizes take
    # about 10 minutes on an idle 2-core CPU.
    teacher_steps: int = 1200
    student_steps: int = 120
    lr: float = 2e-3
    held_out_modules: int = 30
    eval_batches: int = 20
    new_tokens: int = 48
    plot: bool = True  # loss.png for each run

    @classmethod
    def scaled(cls, scale: float = 1.0, out: str = "runs/demo", seed: int = 0, teacher_steps: int | None = None,
               student_steps: int | None = None) -> DemoSettings:
        """Width grows with sqrt(scale) (in whole heads of 32), steps with scale."""
        base = cls()
        n_head = max(2, round(base.n_head * math.sqrt(scale)))
        return dataclasses.replace(
            base, out=out, seed=seed, n_head=n_head, n_embd=32 * n_head,
            teacher_steps=teacher_steps or max(1, round(base.teacher_steps * scale)),
            student_steps=student_steps or max(1, round(base.student_steps * scale)),
        )


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The standard library's own .py files, sorted, without its tests and bundled packages."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not any(part in SKIPPED_FOLDERS or part.startswith("config-")
                              for part in f.relative_to(root).parts[:-1]))
    if not files:
        raise DistilleryError(f"Found no .py files under {root}; is the Python standard library installed?")
    return files


def run_demo(settings: DemoSettings, sources: list[Path] | None = None, progress: bool = True,
             folder: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Tokenizer -> data -> teacher -> student -> distillation -> comparison; returns the report.

    Written in settings.out, or in `folder` when that is not settings.out itself (an --overwrite demo,
    swapped in by the caller); the report names settings.out. With `resume`, an interrupted demo of
    the same settings continues: the tokenizer and data are kept once the data is complete, and
    each run continues from its last checkpoint.
    """
    from distillery.distill.data import META_NAME, TokenDataset, load_meta, prepare_corpus
    from distillery.distill.student import make_student
    from distillery.distill.trainer import CHECKPOINT_NAME, evaluate_loss, load_lm, run
    from distillery.models.checkpoint import write_json
    from distillery.tokenizer import load_tokenizer, train_tokenizer

    out, named = Path(settings.out if folder is None else folder), Path(settings.out)
    wanted = {k: v for k, v in dataclasses.asdict(settings).items() if k != "out"}
    if resume:
        if not (out / SETTINGS_NAME).is_file():
            raise DistilleryError(f"There is no demo to resume in {out} (no {SETTINGS_NAME}); drop --resume to start "
                                  "one.")
        saved = json.loads((out / SETTINGS_NAME).read_text())
        differences = sorted(k for k in wanted if saved.get(k) != wanted[k])
        if differences:
            raise DistilleryError(f"The demo in {out} was started with other settings ({', '.join(differences)}); "
                                  "resume it with its own options, or pass --overwrite without --resume to start "
                                  "afresh.")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SETTINGS_NAME, wanted)
    started = time.perf_counter()
    sources = sources if sources is not None else stdlib_sources()
    data = str(out / "data")
    if resume and (out / "data" / META_NAME).is_file():  # the tokenizer was complete before the data was made
        _say("[1-2/6] the tokenizer and the data of the interrupted demo are kept")
        tokenizer = load_tokenizer(out / "tokenizer")
        meta = load_meta(data)
    else:
        _say(f"[1/6] {len(sources)} standard library modules, "
             f"{sum(f.stat().st_size for f in sources) / 1e6:.1f} MB; training a {settings.vocab_size}-token BPE")
        tokenizer = train_tokenizer(sources, settings.vocab_size, "gpt2", out / "tokenizer", show_progress=progress)
        _say(f"[2/6] tokenizing; {settings.held_out_modules} modules held out for evaluation")
        meta = prepare_corpus(sources, tokenizer, data, val_docs=settings.held_out_modules, seed=settings.seed,
                              overwrite=True)

    run_settings = dict(data=data, tokenizer=str(out / "tokenizer"), seed=settings.seed, seq_len=settings.seq_len,
                        batch_size=settings.batch_size, lr=settings.lr, eval_batches=settings.eval_batches,
                        log_every=10, plot=settings.plot)
    teacher_steps, student_steps = settings.teacher_steps, settings.student_steps
    _say(f"[3/6] pre-training a {settings.teacher_layers}-layer GPT-2 teacher for {plural(teacher_steps, 'step')}")
    teacher_config = RunConfig(
        kind="train", model="gpt2", out=str(named / "teacher"), max_steps=teacher_steps,
        warmup_steps=max(1, teacher_steps // 20), eval_every=max(1, teacher_steps // 4),
        save_every=max(1, teacher_steps // 4),
        # No dropout: the demo sees well under one epoch of its corpus, so nothing to regularise.
        model_overrides=dict(n_layer=settings.teacher_layers, n_head=settings.n_head, n_embd=settings.n_embd,
                             n_positions=settings.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        **run_settings)
    if resume and finished(out / "teacher"):
        _say("      the teacher had finished; kept")
    else:
        run(teacher_config, resume=resume and (out / "teacher" / CHECKPOINT_NAME).is_file(), progress=progress,
            folder=out / "teacher")

    _say("[4/6] making a half-depth student from the teacher's layers")
    teacher = load_lm(str(out / "teacher" / "model"))
    student = make_student(teacher)
    student.save_pretrained(out / "student-init")
    tokenizer.save_pretrained(out / "student-init")

    _say(f"[5/6] distilling the student for {plural(student_steps, 'step')}")
    distill_config = RunConfig(
        kind="distill", teacher=str(out / "teacher" / "model"), student=str(out / "student-init"),
        out=str(named / "student"), max_steps=student_steps, warmup_steps=max(1, student_steps // 20),
        eval_every=max(1, student_steps // 4), save_every=max(1, student_steps // 4), **run_settings)
    if resume and finished(out / "student"):
        _say("      the distillation had finished; kept")
    else:
        run(distill_config, resume=resume and (out / "student" / CHECKPOINT_NAME).is_file(), progress=progress,
            folder=out / "student")

    _say("[6/6] comparing teacher and student on the held-out modules")
    validation = TokenDataset(data, "val")
    eval_config = dataclasses.replace(teacher_config, eval_batches=settings.eval_batches * 2)
    rows = {}
    texts = {}
    for name in ("teacher", "student"):
        model = load_lm(str(out / name / "model"))
        loss = evaluate_loss(model, validation, eval_config, causal=True)
        tokens_per_s = decode_speed(model, tokenizer, settings.new_tokens)
        rows[name] = {"layers": model.config.n_layer, "parameters": model.num_parameters(),
                      "perplexity": math.exp(loss), "decode_tokens_per_s": tokens_per_s, "model": str(named / name / "model")}
        texts[name] = completions(model, tokenizer, PROMPTS, settings.new_tokens)
    report = {"settings": dataclasses.asdict(settings), "corpus": meta.get("counts", {}),
              "chance_perplexity": tokenizer.vocab_size, "models": rows, "completions": texts,
              "minutes": (time.perf_counter() - started) / 60}
    write_json(out / "report.json", report)
    return report


def finished(run_folder: Path) -> bool:
    """Whether a demo's run completed (its summary holds the final evaluation). A finished run is kept
    as it is on --resume: its recorded paths may name the folder it was written in before an
    --overwrite swap, which resuming it would take for other settings."""
    from distillery.distill.trainer import FINAL_MODEL_DIR

    summary = run_folder / "summary.json"
    try:
        return "val_loss" in json.loads(summary.read_text()) and (run_folder / FINAL_MODEL_DIR).is_dir()
    except (OSError, ValueError):
        return False


def completions(model, tokenizer, prompts: tuple[str, ...], new_tokens: int) -> dict[str, str]:
    """Greedy continuations of `prompts` by distillery's text-generation pipeline (to the EOS), with a
    repetition penalty of 1.3: models this small otherwise loop on one line."""
    from distillery.pipelines.text_generation import TextGenerationPipeline

    generator = TextGenerationPipeline(model, tokenizer)
    results = generator(list(prompts), max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.3)
    return {prompt: records[0]["generated_text"] for prompt, records in zip(prompts, results)}


@torch.inference_mode()
def decode_speed(model, tokenizer, new_tokens: int, repeats: int = 5) -> float:
    """Greedy decoding tokens/s at batch 1 with distillery's engine (best of `repeats`, after a warm-up).

    The end-of-text token does not stop it, so every run decodes exactly `new_tokens`.
    """
    from distillery.generation.config import GenerationConfig
    from distillery.generation.engine import generate

    prompt = torch.tensor([tokenizer.encode("def ")])
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False)
    generate(model, prompt, config=GenerationConfig(max_new_tokens=4, do_sample=False))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = generate(model, prompt, config=config).size(1) - prompt.size(1)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def format_report(report: dict[str, Any]) -> str:
    """The side-by-side table and the completions, as printed at the end of the demo."""
    t, s = report["models"]["teacher"], report["models"]["student"]
    lines = [
        "",
        f"{'':28}{'teacher':>14}{'student':>14}",
        f"{'layers':28}{t['layers']:>14}{s['layers']:>14}",
        f"{'parameters':28}{t['parameters']:>14,}{s['parameters']:>14,}",
        f"{'held-out perplexity':28}{t['perplexity']:>14.2f}{s['perplexity']:>14.2f}",
        f"{'decoding tokens/s (batch 1)':28}{t['decode_tokens_per_s']:>14.0f}{s['decode_tokens_per_s']:>14.0f}",
        f"(chance perplexity: {report['chance_perplexity']:,}; {report['minutes']:.1f} minutes in all)",
        "",
    ]
    for prompt in report["completions"]["teacher"]:
        for name in ("teacher", "student"):
            text = report["completions"][name][prompt].replace("\n", "\n" + " " * 12)
            lines.append(f"--- {name:8}{text}")
        lines.append("")
    return "\n".join(lines)


def _say(message: str) -> None:
    # Progress goes to stderr with the progress bars, leaving stdout to the results (or --json).
    print(message, file=sys.stderr, flush=True)
