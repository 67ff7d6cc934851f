"""Token classification (CoNLL-style files) and extractive question answering (SQuAD-style JSON).

Both fine-tune any encoder: RoBERTa, BERT or DistilBERT (a new head on its encoder).

Token classification:
Files: one token per line with its tag in the last column, blank lines between sentences,
`-DOCSTART-` lines ignored (the CoNLL-2003 layout; two-column `word tag` files work too). Each
word is encoded on its own with a leading space (RoBERTa's add_prefix_space; WordPiece ignores it)
and only its first sub-token carries the label, as transformers' run_ner does. Scored with conlleval's entity
precision, recall and F1 (an I- tag that does not continue an entity of its type opens one, so IOB1
and IOB2 both work) and token accuracy.

Question answering, as transformers' run_qa: the question and a context window as the tokenizer
frames a pair (RoBERTa <s> question </s></s> window </s>; BERT [CLS] question [SEP] window [SEP]
with token types 0 then 1), long contexts cut into windows that overlap by `doc_stride` tokens; a
window that does not hold the whole answer is trained to point at the first token (<s> / [CLS]). At evaluation, each example's
answer is the best span (start logit + end logit, at most `max_answer_tokens`) over all its
windows, cut from the context by the tokenizer's character offsets. Scored with SQuAD's exact
match and token F1 against the best of the gold answers, after SQuAD's normalisation.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distillery.evaluate.glue import (
    FinetuneSettings,
    check_finite_weights,
    collate,
    finite_loss,
    forward_padded,
    frame,
    load_with_new_head,
    warmup_linear_decay,
)
from distillery.models.common import DistilleryError

IGNORE = -100


@dataclass
class TaggedSentence:
    words: list[str]
    tags: list[str]


def read_conll(path: str | Path) -> list[TaggedSentence]:
    """Sentences of a CoNLL-style file: the first column is the word, the last the tag."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"{path} does not exist; pass a CoNLL-style file (word ... tag per line).")
    sentences, words, tags = [], [], []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DistilleryError(f"{path} is not UTF-8 text (byte {e.start}); pass a CoNLL-style text file.") from e
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append(TaggedSentence(words, tags))
                words, tags = [], []
            continue
        if len(fields) < 2:
            raise DistilleryError(f"{path} line {number} has no tag column; each line needs `word ... tag`.")
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        sentences.append(TaggedSentence(words, tags))
    if not sentences:
        raise DistilleryError(f"{path} has no sentences.")
    return sentences


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans, conlleval's way: B- always opens, I- opens unless it continues its type."""
    spans, current = set(), None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        continues = current is not None and prefix == "I" and kind == current[0]
        if current is not None and not continues:
            spans.add((current[0], current[1], i))
            current = None
        if prefix in ("B", "I") and not continues:
            current = (kind, i)
    return spans


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entity spans, and token accuracy."""
    found = correct = wanted = 0
    right = total = 0
    for p, g in zip(predicted, gold):
        ps, gs = entities(p), entities(g)
        found, wanted, correct = found + len(ps), wanted + len(gs), correct + len(ps & gs)
        right += sum(a == b for a, b in zip(p, g))
        total += len(g)
    precision = correct / found if found else 0.0
    recall = correct / wanted if wanted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / total if total else 0.0}


def encode_tagged(tokenizer, sentence: TaggedSentence, label_ids: dict[str, int],
                  max_length: int) -> tuple[list[int], list[int]]:
    """<s> word pieces </s> ([CLS] … [SEP]) and labels on each word's first piece (IGNORE elsewhere),
    truncated."""
    ids, labels = [tokenizer.bos_token_id], [IGNORE]
    for word, tag in zip(sentence.words, sentence.tags):
        # Byte-level BPE never gives nothing; WordPiece may (a word of characters its normaliser
        # drops): [UNK] keeps one piece per word, so words and predictions stay aligned.
        pieces = tokenizer.encode(" " + word, add_special_tokens=False) or [tokenizer.unk_token_id]
        ids += pieces
        labels += [label_ids.get(tag, IGNORE)] + [IGNORE] * (len(pieces) - 1)
    ids, labels = ids[:max_length - 1] + [tokenizer.eos_token_id], labels[:max_length - 1] + [IGNORE]
    return ids, labels


def load_tagger(model_path: str | Path, tags: list[str], device: str = "cpu"):
    """An encoder checkpoint with a new token-classification head, one output per tag."""
    return load_with_new_head(model_path, "token-classification", dict(enumerate(tags)), "token classification",
                              device=device)


@torch.no_grad()
def predict_tags(model, tokenizer, sentences: list[TaggedSentence], tags: list[str], max_length: int,
                 batch_size: int) -> list[list[str]]:
    """The tag of each word (words cut off by truncation get "O")."""
    model.eval()
    label_ids = {t: i for i, t in enumerate(tags)}
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = sentences[start:start + batch_size]
        encoded = [encode_tagged(tokenizer, s, label_ids, max_length) for s in batch]
        # Mark word starts with label 0 so unknown gold tags still get a prediction.
        starts = [encode_tagged(tokenizer, TaggedSentence(s.words, [tags[0]] * len(s.words)), label_ids, max_length)[1]
                  for s in batch]
        best = forward_padded(model, tokenizer, [e[0] for e in encoded], tokenizer.pad_token_id).logits.argmax(-1).cpu()
        for row, (sentence, first) in enumerate(zip(batch, starts)):
            predicted = [tags[int(best[row, i])] for i, lab in enumerate(first) if lab != IGNORE]
            out.append(predicted + ["O"] * (len(sentence.words) - len(predicted)))
    return out


def train_on_batches(model, items: list[Any], batch_loss: Callable[[list[Any]], torch.Tensor],
                     settings: FinetuneSettings, desc: str, progress: bool) -> int:
    """settings.epochs passes over `items` in seeded random batches: AdamW, linear warm-up then
    linear decay, gradient clipping; `batch_loss(batch)` gives each batch's loss. Returns the steps."""
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    total = math.ceil(len(items) / settings.batch_size) * settings.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    warmup = int(settings.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear_decay(s, warmup, total))
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for _ in range(settings.epochs):
        model.train()
        order = list(range(len(items)))
        rng.shuffle(order)
        for start in range(0, len(order), settings.batch_size):
            loss = batch_loss([items[i] for i in order[start:start + settings.batch_size]])
            finite_loss(loss, bar.n + 1, settings.learning_rate)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    check_finite_weights(model, settings.learning_rate)
    return total


def finetune_tagger(model, tokenizer, train: list[TaggedSentence], dev: list[TaggedSentence], tags: list[str],
                    settings: FinetuneSettings, progress: bool = True) -> dict[str, Any]:
    """Fine-tune on `train` (cross-entropy on first pieces), then score `dev`."""
    settings.max_length = min(settings.max_length, model.config.max_tokens)
    label_ids = {t: i for i, t in enumerate(tags)}
    encoded = [encode_tagged(tokenizer, s, label_ids, settings.max_length) for s in train]

    def batch_loss(batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        labels, _ = collate([b[1] for b in batch], IGNORE)
        logits = forward_padded(model, tokenizer, [b[0] for b in batch], tokenizer.pad_token_id).logits.float()
        return F.cross_entropy(logits.transpose(1, 2), labels.to(model.device), ignore_index=IGNORE)

    total = train_on_batches(model, encoded, batch_loss, settings, "token classification", progress)
    predicted = predict_tags(model, tokenizer, dev, tags, settings.max_length, settings.batch_size * 2)
    return {"task": "token-classification", "tags": tags, "steps": total, "train_sentences": len(train),
            "metrics": {"dev": {**entity_scores(predicted, [s.tags for s in dev]), "examples": len(dev)}},
            "settings": vars(settings)}


def tag_set(sentences: list[TaggedSentence]) -> list[str]:
    """"O" first, then the other tags sorted."""
    seen = {t for s in sentences for t in s.tags}
    return ["O", *sorted(seen - {"O"})]


# ----------------------------------------------------------------------------------------------
# Extractive question answering


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_start: int | None  # character offset of the first answer (training)


def read_squad(path: str | Path) -> list[QAExample]:
    """Questions of a SQuAD-style JSON file ({"data": [{"paragraphs": [{"context", "qas"}]}]})."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"{path} does not exist; pass a SQuAD-style JSON file.")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        examples = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = qa.get("answers", [])
                    _check_answers(path, str(qa["id"]), paragraph["context"], answers)
                    examples.append(QAExample(str(qa["id"]), qa["question"], paragraph["context"],
                                              [a["text"] for a in answers],
                                              answers[0]["answer_start"] if answers else None))
    except UnicodeDecodeError as e:
        raise DistilleryError(f"{path} is not UTF-8 text (byte {e.start}); pass a SQuAD-style JSON file.") from e
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DistilleryError(f"{path} is not in SQuAD's layout (data / paragraphs / context, qas): {e!r}.") from e
    if not examples:
        raise DistilleryError(f"{path} has no questions.")
    return examples


def _check_answers(path: Path, qid: str, context: str, answers: list[dict[str, Any]]) -> None:
    """Every answer must be the context's text at its answer_start: a span elsewhere would train
    and score the model on the wrong tokens without a word."""
    for answer in answers:
        text, start = answer["text"], answer["answer_start"]
        if not isinstance(start, int) or isinstance(start, bool) or context[start:start + len(text)] != text:
            raise DistilleryError(f"{path}: the answer {text!r} of question {qid} is not in its context at "
                                  f"answer_start {start!r}; fix the file.")


@dataclass
class QAWindow:
    example: int
    ids: list[int]
    context_start: int  # index in ids of the first context token
    offsets: list[tuple[int, int]]  # character span of each context token in the window
    start: int = 0  # answer token positions in ids (0 = <s>: no answer in this window)
    end: int = 0


def qa_windows(tokenizer, examples: list[QAExample], max_length: int, doc_stride: int,
               max_question_tokens: int = 64) -> list[QAWindow]:
    """Every example's context windows with their answer positions."""
    windows = []
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question, add_special_tokens=False)[:max_question_tokens]
        encoding = tokenizer.backend.encode(example.context, add_special_tokens=False)
        ids, offsets = encoding.ids, encoding.offsets
        framed = frame(tokenizer, question, [])  # the pair with an empty window: one token follows it
        prefix = framed[:-1]
        room = max_length - len(framed)
        if room <= doc_stride:
            raise DistilleryError(f"--max-length {max_length} leaves no room for context windows with "
                                  f"--doc-stride {doc_stride}; raise the length or lower the stride.")
        start_char = example.answer_start
        end_char = start_char + len(example.answers[0]) if start_char is not None and example.answers else None
        begin = 0
        while True:
            chunk = range(begin, min(begin + room, len(ids)))
            window = QAWindow(index, frame(tokenizer, question, [ids[i] for i in chunk]), len(prefix),
                              [offsets[i] for i in chunk])
            if end_char is not None and chunk and offsets[chunk[0]][0] <= start_char and end_char <= offsets[chunk[-1]][1]:
                window.start = len(prefix) + next(i for i, (a, b) in enumerate(window.offsets) if b > start_char)
                window.end = len(prefix) + max(i for i, (a, b) in enumerate(window.offsets) if a < end_char)
            windows.append(window)
            if chunk.stop >= len(ids):
                break
            begin += room - doc_stride
    return windows


def normalize_answer(text: str) -> str:
    """SQuAD's: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def squad_scores(predictions: dict[str, str], examples: list[QAExample]) -> dict[str, float]:
    """Exact match and token F1 (x100), each against the best-matching gold answer."""
    def f1(prediction: str, gold: str) -> float:
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    exact = [max(float(normalize_answer(predictions[e.id]) == normalize_answer(a)) for a in e.answers)
             for e in examples if e.answers]
    token_f1 = [max(f1(predictions[e.id], a) for a in e.answers) for e in examples if e.answers]
    return {"exact_match": 100 * sum(exact) / len(exact), "f1": 100 * sum(token_f1) / len(token_f1)}


@torch.no_grad()
def predict_answers(model, tokenizer, examples: list[QAExample], windows: list[QAWindow], batch_size: int,
                    max_answer_tokens: int = 30, n_best: int = 20) -> dict[str, str]:
    """The best span of each example over its windows (empty string if none is valid)."""
    model.eval()
    best: dict[int, tuple[float, str]] = {}
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        logits = forward_padded(model, tokenizer, [w.ids for w in batch], tokenizer.pad_token_id).logits.float().cpu()
        for row, window in enumerate(batch):
            first, last = window.context_start, window.context_start + len(window.offsets) - 1
            starts = logits[row, first:last + 1, 0]
            ends = logits[row, first:last + 1, 1]
            for s in starts.topk(min(n_best, len(starts))).indices.tolist():
                for e in ends.topk(min(n_best, len(ends))).indices.tolist():
                    if s <= e < s + max_answer_tokens:
                        score = float(starts[s] + ends[e])
                        if window.example not in best or score > best[window.example][0]:
                            context = examples[window.example].context
                            best[window.example] = (score, context[window.offsets[s][0]:window.offsets[e][1]])
    return {e.id: best.get(i, (0.0, ""))[1] for i, e in enumerate(examples)}


def finetune_qa(model, tokenizer, train: list[QAExample], dev: list[QAExample], settings: FinetuneSettings,
                doc_stride: int = 128, progress: bool = True) -> dict[str, Any]:
    """Fine-tune start/end prediction on `train`, then exact match and F1 on `dev`."""
    settings.max_length = min(settings.max_length, model.config.max_tokens)
    windows = qa_windows(tokenizer, train, settings.max_length, doc_stride)

    def batch_loss(batch: list[QAWindow]) -> torch.Tensor:
        logits = forward_padded(model, tokenizer, [w.ids for w in batch], tokenizer.pad_token_id).logits.float()
        targets = torch.tensor([[w.start, w.end] for w in batch], device=model.device)
        return (F.cross_entropy(logits[..., 0], targets[:, 0]) + F.cross_entropy(logits[..., 1], targets[:, 1])) / 2

    total = train_on_batches(model, windows, batch_loss, settings, "question answering", progress)
    dev_windows = qa_windows(tokenizer, dev, settings.max_length, doc_stride)
    predictions = predict_answers(model, tokenizer, dev, dev_windows, settings.batch_size * 2)
    return {"task": "question-answering", "steps": total, "train_examples": len(train),
            "train_windows": len(windows), "metrics": {"dev": {**squad_scores(predictions, dev),
                                                               "examples": len(dev)}},
            "doc_stride": doc_stride, "settings": vars(settings)}
