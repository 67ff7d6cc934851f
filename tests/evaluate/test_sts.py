"""STS scoring: both file layouts, the correlations against SciPy, the interval, and bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import minilm_dir, save_tiny_sentence_encoder
from sts_files import GLUE_HEADER, PAIRS
from sts_files import write_glue_sts as write_glue

from distillery.cli import main
from distillery.evaluate.sts import (
    STSDataError,
    average_ranks,
    pearson,
    read_sts,
    spearman,
    spearman_interval,
)


def write_original(path, pairs=PAIRS):
    path.write_text("".join(f"main-news\theadlines\t2013\t{i:04d}\t{s}\t{a}\t{b}\textra\tcolumns\n"
                            for i, (a, b, s) in enumerate(pairs)))
    return path


def test_both_layouts_read_the_same_pairs(tmp_path):
    glue, original = read_sts(write_glue(tmp_path / "dev.tsv")), read_sts(write_original(tmp_path / "sts-dev.tsv"))
    assert glue.first == original.first == [a for a, _, _ in PAIRS]
    assert glue.second == original.second
    np.testing.assert_allclose(glue.scores, [s for _, _, s in PAIRS])


def test_real_files_read(shared_data):
    assert len(read_sts(shared_data / "glue" / "STS-B" / "dev.tsv")) == 1500
    assert len(read_sts(shared_data / "glue" / "STS-B" / "original" / "sts-test.tsv")) == 1379
    with pytest.raises(STSDataError, match="no 'score' column"):
        read_sts(shared_data / "glue" / "STS-B" / "test.tsv")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_equal_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(average_ranks(x), stats.rankdata(x))


def test_interval_surrounds_rho_and_narrows_with_n():
    low, high = spearman_interval(0.8, 100)
    assert low < 0.8 < high
    low2, high2 = spearman_interval(0.8, 1000)
    assert high2 - low2 < high - low


@pytest.mark.parametrize("content, message", [
    (GLUE_HEADER.replace("\tscore", "") + "0\tg\tf\ty\t0\tn\tn\ta\tb\n", "no 'score' column"),
    ("g\tf\ty\t0\t7.5\tA b.\tC d.\n" * 4, "outside STS's 0-5 range"),
    ("g\tf\ty\t0\thigh\tA b.\tC d.\n" * 4, "not a number"),
    ("only\ttwo\n", "columns"),
    ("", "is empty"),
])
def test_bad_files_are_one_sentence(tmp_path, content, message):
    file = tmp_path / "bad.tsv"
    file.write_text(content)
    with pytest.raises(STSDataError, match=message):
        read_sts(file)


def test_eval_sts_command(tmp_path, capsys):
    model = save_tiny_sentence_encoder(tmp_path / "st")
    data = write_glue(tmp_path / "dev.tsv")
    assert main(["eval", "sts", str(model), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"spearman", "pearson", "spearman_ci", "sentences_per_second"} <= set(result)
    assert -100 <= result["spearman"] <= 100 and result["pairs"] == 5
    assert main(["eval", "sts", str(model), "--data", str(tmp_path / "missing.tsv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_model_scores_its_published_figure(shared_data):
    """all-MiniLM-L6-v2 on the STS benchmark test set: 82.03, the figure its publishers report."""
    from distillery.evaluate.sts import evaluate_sts
    from distillery.models.sentence_encoder import load_sentence_encoder

    pairs = read_sts(shared_data / "glue" / "STS-B" / "original" / "sts-test.tsv")
    result = evaluate_sts(load_sentence_encoder(minilm_dir()), pairs, batch_size=64)
    assert round(result["spearman"], 2) == 82.03
