"""GLUE: read the tasks' tsv files, fine-tune an encoder classifier, score the dev sets.

Files are read the way GLUE's own loaders read them: tab-separated, no quoting (MRPC and SST-2
contain lone double quotes), a UTF-8 BOM ignored (MRPC starts with one). Columns are found by
the header names GLUE ships; CoLA has no header (source, label, original judgement, sentence).
RTE is accepted both in GLUE's layout (string labels) and in Hugging Face's export
(sentence1, sentence2, label, idx with 0 = entailment), which use the same label order.

Any encoder fine-tunes: RoBERTa, BERT or DistilBERT. A pair is framed as the tokenizer's own pair
call frames it (RoBERTa `<s> A </s></s> B </s>`, BERT `[CLS] A [SEP] B [SEP]`), and a BERT
tokenizer's batches carry token_type_ids (0 for A, 1 for B; DistilBERT ignores them).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distillery.models.common import DistilleryError, weights_finite

# ----------------------------------------------------------------------------------------------
# Metrics (plain numpy; formulas as in scikit-learn / scipy.stats)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def f1_binary(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1): 2 TP / (2 TP + FP + FN); 0 when there is none."""
    p, y = np.asarray(predictions), np.asarray(labels)
    tp = int(np.sum((p == 1) & (y == 1)))
    denominator = 2 * tp + int(np.sum((p == 1) & (y != 1))) + int(np.sum((p != 1) & (y == 1)))
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for binary labels; 0 when undefined."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y)) / denominator if denominator else 0.0


def average_ranks(x: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of their ranks (scipy.stats.rankdata's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class GlueTask:
    """Where a task's texts and labels are, its label names (None: regression) and dev splits."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    card_metric: str  # the number the model cards' GLUE row shows
    dev_files: dict[str, str] = field(default_factory=lambda: {"dev": "dev.tsv"})


# CoLA's files have no header; these names stand for its four columns.
COLA_COLUMNS = ("source", "label", "original_label", "sentence")

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", ("sentence",), "label", ("unacceptable", "acceptable"), ("matthews_corr",), "matthews_corr"),
    GlueTask("sst2", ("sentence",), "label", ("negative", "positive"), ("accuracy",), "accuracy"),
    GlueTask("mrpc", ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"),
             ("accuracy", "f1"), "accuracy"),
    GlueTask("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), "pearson"),
    GlueTask("rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    GlueTask("qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",), "accuracy"),
    GlueTask("qqp", ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
             ("accuracy", "f1"), "accuracy"),
    GlueTask("mnli", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("accuracy",), "accuracy",
             {"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"}),
    GlueTask("wnli", ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
]}
# The model cards' column order and names.
CARD_ORDER = [("mnli", "MNLI"), ("qqp", "QQP"), ("qnli", "QNLI"), ("sst2", "SST-2"), ("cola", "CoLA"),
              ("stsb", "STS-B"), ("mrpc", "MRPC"), ("rte", "RTE"), ("wnli", "WNLI")]


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise DistilleryError(f"GLUE task {name!r} does not exist; choose one of {sorted(TASKS)}.")
    return TASKS[key]


@dataclass
class Example:
    texts: tuple[str, ...]
    label: float | int


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _label_value(task: GlueTask, raw: str, path: Path, line: int) -> float | int:
    raw = raw.strip()
    try:
        if task.labels is None:
            return float(raw)
        if raw in task.labels:
            return task.labels.index(raw)
        value = int(raw)
        if 0 <= value < len(task.labels):
            return value
    except ValueError:
        pass
    expected = "a number" if task.labels is None else f"one of {list(task.labels)} or 0..{len(task.labels) - 1}"
    raise DistilleryError(f"{path} line {line}: label {raw!r} is not {expected}; is this the {task.name} file?")


def read_split(task: GlueTask, path: Path) -> list[Example]:
    """Labelled examples of one GLUE tsv file."""
    if not path.is_file():
        raise DistilleryError(f"{path} is missing; the {task.name} folder needs train.tsv and its dev file(s).")
    rows = _read_tsv(path)
    if task.name == "cola" and rows and rows[0][0] != "sentence":
        header, body, first_line = list(COLA_COLUMNS), rows, 1
    else:
        header, body, first_line = rows[0] if rows else [], rows[1:], 2
    wanted = (*task.text_columns, task.label_column)
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DistilleryError(
            f"{path} lacks the column(s) {missing} of GLUE's {task.name} layout (found {header[:6]}); "
            "use GLUE's own tsv files."
        )
    where = [header.index(c) for c in wanted]
    examples = []
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(where):
            raise DistilleryError(f"{path} line {line} has {len(row)} fields, fewer than {task.name}'s header names.")
        examples.append(Example(tuple(row[i] for i in where[:-1]),
                                _label_value(task, row[where[-1]], path, line)))
    if not examples:
        raise DistilleryError(f"{path} has no examples.")
    return examples


def read_task(task: GlueTask, directory: str | Path) -> dict[str, list[Example]]:
    """{"train": ..., "dev": ...} (MNLI: "matched" and "mismatched") from a GLUE task folder.

    CoLA may also be the official cola_public release: train = raw/in_domain_train.tsv, dev =
    in-domain + out-of-domain dev, as GLUE built its dev.tsv.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DistilleryError(f"{directory} is not a folder; pass the task's GLUE folder with --data.")
    raw = directory / "cola_public" / "raw"
    if task.name == "cola" and not (directory / "train.tsv").exists() and raw.is_dir():
        return {"train": read_split(task, raw / "in_domain_train.tsv"),
                "dev": read_split(task, raw / "in_domain_dev.tsv") + read_split(task, raw / "out_of_domain_dev.tsv")}
    splits = {"train": read_split(task, directory / "train.tsv")}
    for name, file in task.dev_files.items():
        splits[name] = read_split(task, directory / file)
    return splits


def score(task: GlueTask, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    functions: dict[str, Callable] = {"accuracy": accuracy, "f1": f1_binary, "matthews_corr": matthews_corrcoef,
                                      "pearson": pearson, "spearman": spearman}
    return {m: functions[m](predictions, labels) for m in task.metrics}


# ----------------------------------------------------------------------------------------------
# Batches and the fine-tuning loop


def is_wordpiece(tokenizer) -> bool:
    """A BERT-style tokenizer: [CLS] A [SEP] B [SEP] with token types."""
    return getattr(tokenizer, "style", None) == "bert"


def frame(tokenizer, first: list[int], second: list[int] | None = None) -> list[int]:
    """One text's or a pair's ids with special tokens where the tokenizer's pair call puts them:
    BERT [CLS] A [SEP] (B [SEP]), RoBERTa <s> A </s> (</s> B </s>)."""
    if is_wordpiece(tokenizer):
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        return [cls, *first, sep] + ([] if second is None else [*second, sep])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [bos, *first, eos] + ([] if second is None else [eos, *second, eos])


def encode_example(tokenizer, texts: tuple[str, ...], max_length: int) -> list[int]:
    """One text or a pair, framed by `frame`, the longer text truncated first, token by token."""
    parts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    budget = max_length - len(frame(tokenizer, *[[] for _ in parts]))
    if budget < len(parts):  # not one token of each text would fit: truncation could never end
        raise DistilleryError(f"--max-length {max_length} leaves no room for the text after the special tokens; "
                              f"pass at least {max_length - budget + len(parts)}.")
    while sum(map(len, parts)) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest] = parts[longest][:-1]
    return frame(tokenizer, *parts)


def token_types(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """BERT's segment ids, (B, T): 0 up to and including the first [SEP], 1 after it."""
    is_sep = input_ids == sep_id
    return (is_sep.cumsum(-1) - is_sep.long() > 0).long()


def forward_padded(model, tokenizer, rows: list[list[int]], pad_id: int):
    """The model's output on right-padded rows, with token_type_ids when the tokenizer is BERT's."""
    ids, mask = collate(rows, pad_id)
    kwargs = {"attention_mask": mask.to(model.device)}
    if is_wordpiece(tokenizer):
        kwargs["token_type_ids"] = (token_types(ids, tokenizer.sep_token_id) * mask).to(model.device)
    return model(ids.to(model.device), **kwargs)


def collate(encoded: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest in the batch: (input_ids, attention_mask)."""
    longest = max(map(len, encoded))
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def load_with_new_head(model_path: str | Path, head: str, id2label: dict[int, str], purpose: str,
                       problem_type: str | None = None, device: str = "cpu"):
    """An encoder checkpoint (RoBERTa, BERT, DistilBERT) with a fresh `head` for these labels.

    The encoder's weights are kept; a classifier the checkpoint already has is dropped, as its
    labels belong to another task (BERT's pooler stays: it is pre-trained with the encoder).
    """
    from distillery.models import checkpoint

    directory = checkpoint.resolve_model_dir(model_path)
    hf = checkpoint.read_config(directory)
    family, _ = checkpoint.family_and_task(hf, directory / checkpoint.CONFIG_NAME, None)
    if head not in checkpoint.FAMILY_TASKS[family]:
        raise DistilleryError(f"{directory}: {purpose} needs an encoder checkpoint (RoBERTa, BERT or DistilBERT), "
                              f"not a {family} model.")
    config = checkpoint.config_from_hf(family, hf)
    config.id2label, config.problem_type = id2label, problem_type
    model = checkpoint.build_model(config, head)
    their_state = {k: v for k, v in checkpoint.read_state_dict(directory).items()
                   if not k.startswith(("classifier.", "pre_classifier."))}
    checkpoint.load_hf_state_dict(model, their_state, source=directory)
    return model.to(device)


def load_classifier(model_path: str | Path, task: GlueTask, device: str = "cpu"):
    """A sequence classifier from an encoder checkpoint, its head sized for `task`."""
    if task.labels is None:
        return load_with_new_head(model_path, "sequence-classification", {0: "LABEL_0"}, "GLUE fine-tuning",
                                  "regression", device)
    return load_with_new_head(model_path, "sequence-classification", dict(enumerate(task.labels)),
                              "GLUE fine-tuning", "single_label_classification", device)


def loss_fn(task: GlueTask, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for STS-B's regression."""
    if task.labels is None:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


@torch.no_grad()
def predict(model, tokenizer, task: GlueTask, encoded: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """Class indices (or regression scores) for encoded examples, in order."""
    model.eval()
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        logits = forward_padded(model, tokenizer, encoded[start:start + batch_size], pad_id).logits.float()
        out += (logits.squeeze(-1) if task.labels is None else logits.argmax(-1)).tolist()
    return out


@dataclass
class FinetuneSettings:
    """The recipe: AdamW, linear warm-up then linear decay to zero, a few epochs."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    seed: int = 42
    max_train_examples: int | None = None
    max_grad_norm: float = 1.0


def finite_loss(loss: torch.Tensor, step: int, learning_rate: float) -> float:
    """The loss as a float, or a sentence when it is NaN or infinite: from there on the weights are
    broken and every later number would be NaN, so fine-tuning stops instead of reporting them."""
    value = loss.item()
    if not math.isfinite(value):
        raise DistilleryError(f"The training loss became {value} at step {step}; lower --lr (now {learning_rate:g}) "
                              "or check the data.")
    return value


def check_finite_weights(model: torch.nn.Module, learning_rate: float) -> None:
    """After the last step: an update can break the weights after the last loss was seen finite,
    and every score of broken weights is NaN, so fine-tuning stops with a sentence instead."""
    if not weights_finite(model):
        raise DistilleryError(f"The weights became NaN or infinite in the last steps of fine-tuning; lower --lr (now "
                              f"{learning_rate:g}).")


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor: step/warmup rising to 1, then falling linearly to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def finetune_glue(model, tokenizer, task: GlueTask, splits: dict[str, list[Example]],
                  settings: FinetuneSettings, progress: bool = True) -> dict[str, Any]:
    """Fine-tune `model` on splits["train"] and score every dev split; returns the results record."""
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    train = list(splits["train"])
    if settings.max_train_examples:
        train = rng.sample(train, min(settings.max_train_examples, len(train)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    # Never longer than the model's positions (RoBERTa's start after the padding index).
    settings.max_length = min(settings.max_length, model.config.max_tokens)
    encoded = [encode_example(tokenizer, e.texts, settings.max_length) for e in train]
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases and LayerNorms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    warmup = int(settings.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear_decay(s, warmup, total))
    losses = []
    bar = tqdm(total=total, desc=f"glue {task.name}", disable=not progress)
    for _ in range(settings.epochs):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            labels = torch.tensor([train[i].label for i in batch])
            logits = forward_padded(model, tokenizer, [encoded[i] for i in batch], pad_id).logits
            loss = loss_fn(task, logits, labels.to(model.device))
            finite_loss(loss, len(losses) + 1, settings.learning_rate)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    check_finite_weights(model, settings.learning_rate)
    results: dict[str, Any] = {}
    for name, examples in splits.items():
        if name == "train":
            continue
        dev_encoded = [encode_example(tokenizer, e.texts, settings.max_length) for e in examples]
        predictions = predict(model, tokenizer, task, dev_encoded, pad_id, settings.batch_size * 2)
        results[name] = {**score(task, predictions, [e.label for e in examples]), "examples": len(examples)}
    return {
        "task": task.name,
        "metrics": results,
        "card_score": card_score(task, results),
        "train_examples": len(train),
        "steps": total,
        "final_train_loss": sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]) if losses else None,
        "settings": vars(settings),
    }


def card_score(task: GlueTask, metrics: dict[str, dict[str, float]]) -> float:
    """The one number the cards' GLUE row shows, x100 (MNLI: matched accuracy)."""
    split = "matched" if task.name == "mnli" else "dev"
    return round(100 * metrics[split][task.card_metric], 1)


def card_row(scores: dict[str, float]) -> str:
    """Markdown table (header, rule, row) in the cards' order; tasks not scored show '–'."""
    names = [label for _, label in CARD_ORDER]
    values = [f"{scores[key]:.1f}" if key in scores else "–" for key, _ in CARD_ORDER]
    return "\n".join(["| " + " | ".join(names) + " |", "|" + "---|" * len(names), "| " + " | ".join(values) + " |"])
