"""GLUE readers on the real files, metrics against hand-computed values, a tiny fine-tuning run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_roberta

from distillery.evaluate import glue
from distillery.models.common import DistilleryError


class CharTokenizer:
    """Each character is one token id in 5..98 (the tiny models' vocabulary)."""

    bos_token_id, pad_token_id, eos_token_id, mask_token_id = 0, 1, 2, 4

    def encode(self, text, add_special_tokens=True):
        return [5 + ord(c) % 94 for c in text]


def test_metrics_by_hand():
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]  # TP 2, FP 1, FN 1, TN 2
    assert glue.accuracy(predictions, labels) == pytest.approx(4 / 6)
    assert glue.f1_binary(predictions, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert glue.matthews_corrcoef(predictions, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert glue.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # undefined -> 0, as scikit-learn
    assert glue.f1_binary([0, 0], [0, 0]) == 0.0


def test_correlations_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    assert glue.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    # Spearman with ties: ranks by hand, then numpy's Pearson.
    a, b = [1, 2, 2, 3, 5], [2, 1, 4, 4, 6]
    assert list(glue.average_ranks(a)) == [1, 2.5, 2.5, 4, 5]
    assert glue.spearman(a, b) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4, 5], [2, 1, 3.5, 3.5, 5])[0, 1])
    assert glue.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


@pytest.mark.parametrize("task,folder,dev_count,label_counts", [
    ("sst2", "SST-2", 872, {0: 428, 1: 444}),
    ("mrpc", "MRPC", 408, {0: 129, 1: 279}),
    ("cola", "CoLA", 1043, {0: 324, 1: 719}),
    ("rte", "RTE", 277, {0: 146, 1: 131}),
    ("stsb", "STS-B", 1500, None),
])
def test_real_dev_sets(shared_data, task, folder, dev_count, label_counts):
    t = glue.get_task(task)
    dev = glue.read_split(t, shared_data / "glue" / folder / "dev.tsv") if task != "cola" else \
        glue.read_task(t, shared_data / "glue" / folder)["dev"]
    assert len(dev) == dev_count
    assert all(len(e.texts) == len(t.text_columns) and all(e.texts) for e in dev)
    if label_counts:
        assert {k: sum(e.label == k for e in dev) for k in label_counts} == label_counts
    else:
        assert all(0.0 <= e.label <= 5.0 for e in dev)
    if task == "mrpc":
        assert dev[0].texts[1].startswith('"The foodservice')  # a lone quote stays in the text


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_bad_folders(tmp_path):
    sst2 = glue.get_task("SST-2")
    _write(tmp_path / "a" / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(DistilleryError, match="dev.tsv is missing"):
        glue.read_task(sst2, tmp_path / "a")
    _write(tmp_path / "b" / "train.tsv", "text\tlabel\ngood\t1\n")
    _write(tmp_path / "b" / "dev.tsv", "text\tlabel\ngood\t1\n")
    with pytest.raises(DistilleryError, match=r"lacks the column\(s\) \['sentence'\]"):
        glue.read_task(sst2, tmp_path / "b")
    _write(tmp_path / "c" / "train.tsv", "sentence\tlabel\ngood\tpositive-ish\n")
    with pytest.raises(DistilleryError, match="line 2: label 'positive-ish'"):
        glue.read_split(sst2, tmp_path / "c" / "train.tsv")
    with pytest.raises(DistilleryError, match="GLUE task 'sts' does not exist"):
        glue.get_task("sts")


def test_mnli_layout_and_string_labels(tmp_path):
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(tmp_path / name, header + "0\t1\t2\tfiction\tA cat.\tAn animal.\tentailment\tentailment\n"
               "1\t1\t2\tfiction\tA cat.\tA dog.\tcontradiction\tcontradiction\n")
    splits = glue.read_task(glue.get_task("mnli"), tmp_path)
    assert set(splits) == {"train", "matched", "mismatched"}
    assert [e.label for e in splits["matched"]] == [0, 2]


def test_encode_pair_truncates_longest_first():
    ids = glue.encode_example(CharTokenizer(), ("abcdefgh", "xy"), max_length=10)
    assert len(ids) == 10 and ids[0] == 0 and ids.count(2) == 3
    assert ids[-4:] == [2, 5 + ord("x") % 94, 5 + ord("y") % 94, 2]  # the short text kept whole


@pytest.mark.parametrize("task_name", ["sst2", "stsb"])
def test_finetune_tiny_model_learns(tmp_path, task_name):
    task = glue.get_task(task_name)
    model_dir = save_tiny_roberta(tmp_path / "r", "RobertaForMaskedLM")
    model = glue.load_classifier(model_dir, task)
    assert model.task == "sequence-classification" and model.config.num_labels == (2 if task.labels else 1)
    if task.labels:
        examples = [glue.Example(("aaaa",), 1), glue.Example(("zzzz",), 0)] * 8
    else:
        examples = [glue.Example(("aaaa", "aaab"), 4.5), glue.Example(("zzzz", "a"), 0.5)] * 8
    settings = glue.FinetuneSettings(epochs=5, batch_size=8, learning_rate=5e-3, max_length=16)
    result = glue.finetune_glue(model, CharTokenizer(), task, {"train": examples, "dev": examples[:4]},
                                settings, progress=False)
    dev = result["metrics"]["dev"]
    if task.labels:
        assert dev["accuracy"] == 1.0
    else:
        assert dev["pearson"] > 0.9
    assert result["steps"] == 5 * 2 and result["card_score"] == round(100 * dev[task.card_metric], 1)


def test_classifier_head_replaced_for_new_task(tmp_path):
    model_dir = save_tiny_roberta(tmp_path / "c", "RobertaForSequenceClassification")  # 2 labels
    model = glue.load_classifier(model_dir, glue.get_task("mnli"))
    assert model.config.num_labels == 3
    logits = model(torch.tensor([[0, 5, 6, 2]])).logits
    assert logits.shape == (1, 3)


def test_card_row():
    row = glue.card_row({"sst2": 91.25, "cola": 40.0})
    assert row.splitlines()[0].startswith("| MNLI | QQP | QNLI | SST-2 | CoLA")
    assert row.splitlines()[2] == "| – | – | – | 91.2 | 40.0 | – | – | – | – |"
