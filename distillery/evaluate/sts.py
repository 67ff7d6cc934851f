"""Semantic textual similarity: how well the cosine of two sentence embeddings ranks sentence pairs.

The STS benchmark scores each pair from 0 (unrelated) to 5 (same meaning). A sentence encoder is
scored by the correlation between the cosine of the pair's embeddings and the gold scores:
Spearman's rank correlation (the figure papers report, x 100) and Pearson's. Two file layouts
are read, both tab-separated with no quoting:

- GLUE's `STS-B/{train,dev}.tsv`: a header row naming `sentence1`, `sentence2` and `score`;
- the original `sts-{train,dev,test}.tsv`: no header, columns genre, file, year, id, score,
  sentence1, sentence2 (some rows carry extra columns after them).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillery.models.common import DistilleryError

GLUE_COLUMNS = ("sentence1", "sentence2", "score")
ORIGINAL_SCORE, ORIGINAL_FIRST, ORIGINAL_SECOND = 4, 5, 6
SCORE_RANGE = (0.0, 5.0)


class STSDataError(DistilleryError):
    """An STS file that cannot be scored."""


@dataclass
class STSPairs:
    first: list[str]
    second: list[str]
    scores: np.ndarray  # (N,) gold similarity, 0..5

    def __len__(self) -> int:
        return len(self.scores)


def read_sts(path: str | Path) -> STSPairs:
    """Sentence pairs and gold scores from a GLUE STS-B tsv or an original sts-*.tsv file."""
    file = Path(path)
    if not file.is_file():
        raise STSDataError(f"{file} is not a file; pass an STS-B tsv such as STS-B/dev.tsv or sts-test.tsv.")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise STSDataError(f"{file} is not UTF-8 text ({e}); pass an STS-B tsv file.") from e
    rows = [r for r in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if not rows:
        raise STSDataError(f"{file} is empty; pass an STS-B tsv file with scored sentence pairs.")
    header = rows[0]
    if "sentence1" in header or "sentence2" in header:
        missing = [c for c in GLUE_COLUMNS if c not in header]
        if missing:
            raise STSDataError(f"{file} has no {missing[0]!r} column (its header: {', '.join(header)}); "
                               "STS needs scored pairs, so use a train or dev file, not GLUE's unscored test.tsv.")
        a, b, s = (header.index(c) for c in GLUE_COLUMNS)
        body, first_line = rows[1:], 2
    else:
        a, b, s = ORIGINAL_FIRST, ORIGINAL_SECOND, ORIGINAL_SCORE
        body, first_line = rows, 1
    first, second, scores = [], [], []
    for line, row in enumerate(body, start=first_line):
        if len(row) <= max(a, b, s):
            raise STSDataError(f"{file}, line {line}: {len(row)} columns, but the score and both sentences need "
                               f"{max(a, b, s) + 1}; is this an STS file?")
        try:
            score = float(row[s])
        except ValueError:
            raise STSDataError(f"{file}, line {line}: the score column holds {row[s]!r}, not a number; is this "
                               "an STS file with scores?") from None
        if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
            raise STSDataError(f"{file}, line {line}: score {score} lies outside STS's 0-5 range; fix the file.")
        first.append(row[a])
        second.append(row[b])
        scores.append(score)
    if len(scores) < 3:
        raise STSDataError(f"{file} holds {len(scores)} scored pairs; a correlation needs at least 3.")
    return STSPairs(first, second, np.asarray(scores, dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# Correlations


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2)."""
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def spearman_interval(rho: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % confidence interval of Spearman's rho by Fisher's z-transform with Bonett and Wright's
    (2000) standard error for rank correlations:

        atanh(rho) +- z * sqrt(1 + rho^2 / 2) / sqrt(n - 3), mapped back with tanh.
    """
    if n <= 3 or not math.isfinite(rho) or abs(rho) >= 1:
        return (rho, rho)
    centre, half = math.atanh(rho), z * math.sqrt(1 + rho * rho / 2) / math.sqrt(n - 3)
    return (math.tanh(centre - half), math.tanh(centre + half))


# ----------------------------------------------------------------------------------------------
# Scoring an encoder


def evaluate_sts(encoder, pairs: STSPairs, batch_size: int = 32) -> dict[str, Any]:
    """Spearman and Pearson (x 100) of the pairs' cosine against the gold scores, the Spearman
    interval, and how many sentences per second the encoder embedded."""
    started = time.perf_counter()
    first = encoder.encode(pairs.first, batch_size=batch_size, normalize_embeddings=True)
    second = encoder.encode(pairs.second, batch_size=batch_size, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    cosine = (first.astype(np.float64) * second.astype(np.float64)).sum(axis=1)
    rho, r = spearman(cosine, pairs.scores), pearson(cosine, pairs.scores)
    low, high = spearman_interval(rho, len(pairs))
    return {
        "pairs": len(pairs),
        "spearman": 100 * rho,
        "pearson": 100 * r,
        "spearman_ci": [100 * low, 100 * high],
        "sentences_per_second": 2 * len(pairs) / seconds,
        "seconds": seconds,
        "batch_size": batch_size,
    }


def compare_speed(student, teacher, sentences: list[str], batch_size: int = 32, repeats: int = 3) -> dict[str, Any]:
    """Sentences per second of two encoders on the same sentences, timed alternately in one process
    (median of `repeats` rounds each) so that both see the same machine; and the student's speed-up."""
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for encoder in (student, teacher):  # a first, untimed pass: lazy initialisation, caches
        encoder.encode(sentences[:batch_size], batch_size=batch_size)
    for _ in range(repeats):
        for name, encoder in (("student", student), ("teacher", teacher)):
            started = time.perf_counter()
            encoder.encode(sentences, batch_size=batch_size)
            times[name].append(time.perf_counter() - started)
    rates = {name: len(sentences) / float(np.median(seconds)) for name, seconds in times.items()}
    return {"sentences": len(sentences), "batch_size": batch_size, "repeats": repeats,
            "student_sentences_per_second": rates["student"], "teacher_sentences_per_second": rates["teacher"],
            "speedup": rates["student"] / rates["teacher"]}
