"""`distillery bench` on tiny models: the report's structure and its refusals (never its timings)."""

from __future__ import annotations

import json

import pytest
import torch

from distillery.cli import main
from distillery.generation.bench import (
    BenchSettings,
    bytes_read_per_token,
    load_bench_model,
    run_bench,
    student_vs_teacher,
)
from distillery.generation.quantize import quantize_model
from distillery.models import DistilleryError, load_model

TINY = dict(batch_sizes=(1, 2), prompt_tokens=4, new_tokens=3, forward_shape=(1, 8), repeats=1,
            bandwidth_megabytes=8)


def test_report_structure(tiny_gpt2_dir, tiny_roberta_dir):
    report = run_bench([str(tiny_gpt2_dir), str(tiny_roberta_dir)], BenchSettings(dtypes=("int8",), **TINY))
    assert report["machine"]["bandwidth_gb_per_s"] > 0
    assert report["machine"]["device"] == report["settings"]["device"] == "cpu"
    gpt2, roberta = report["results"]
    assert "peak_gpu_mb" not in gpt2
    assert (gpt2["dtype"], gpt2["layout"], roberta["family"]) == ("int8", "int8", "roberta")
    assert set(gpt2["decode"]) == {"1", "2"}
    one = gpt2["decode"]["1"]
    assert one["tokens_per_s"] > 0 and one["ttft_ms"] > 0 and 0 < one["fraction_of_bandwidth_limit"]
    assert one["reference"]["tokens_per_s"] > 0 and one["speedup"] > 0
    assert "fraction_of_bandwidth_limit" not in gpt2["decode"]["2"]
    assert gpt2["forward_ms"] > 0 and gpt2["reference_forward_ms"] > 0
    assert roberta["fill_mask_ms"] > 0 and roberta["fill_mask_speedup"] > 0
    assert "decode" not in roberta
    assert report["student_vs_teacher"] == []  # one causal LM only
    json.dumps(report)  # plain JSON


def test_student_vs_teacher_compares_with_the_largest(tmp_path):
    from conftest import save_tiny_gpt2

    small = save_tiny_gpt2(tmp_path / "small", n_layer=1)
    large = save_tiny_gpt2(tmp_path / "large", n_layer=3)
    report = run_bench([str(small), str(large)], BenchSettings(reference=False, **TINY))
    [entry] = report["student_vs_teacher"]
    assert (entry["student"], entry["teacher"]) == (str(small), str(large))
    assert entry["decode_speedup"] > 0 and entry["forward_speedup"] > 0
    assert "reference" not in report["results"][0]["decode"]["1"]


def test_student_vs_teacher_pairs_within_a_dtype():
    rows = [
        {"model": "s", "dtype": "fp32", "family": "gpt2", "parameters": 1, "forward_ms": 1.0,
         "decode": {"1": {"tokens_per_s": 20.0}}},
        {"model": "t", "dtype": "fp32", "family": "gpt2", "parameters": 2, "forward_ms": 2.0,
         "decode": {"1": {"tokens_per_s": 10.0}}},
        {"model": "t", "dtype": "int8", "family": "gpt2", "parameters": 2, "forward_ms": 0.5,
         "decode": {"1": {"tokens_per_s": 40.0}}},
        {"model": "rs", "dtype": "fp32", "family": "roberta", "parameters": 1, "forward_ms": 1.0,
         "fill_mask_ms": 4.0},
        {"model": "rt", "dtype": "fp32", "family": "roberta", "parameters": 3, "forward_ms": 3.0,
         "fill_mask_ms": 6.0},
    ]
    assert student_vs_teacher(rows) == [
        {"student": "s", "teacher": "t", "dtype": "fp32", "forward_speedup": 2.0, "decode_speedup": 2.0},
        {"student": "rs", "teacher": "rt", "dtype": "fp32", "forward_speedup": 3.0, "fill_mask_speedup": 1.5},
    ]


def test_int8_reads_about_a_quarter_of_the_bytes(tiny_gpt2_dir):
    fp32 = bytes_read_per_token(load_model(tiny_gpt2_dir))
    int8 = bytes_read_per_token(quantize_model(load_model(tiny_gpt2_dir), "int8"))
    assert 0.25 < int8 / fp32 < 0.4  # int8 weights plus float scales, biases and LayerNorms


def test_presets_build_random_models():
    model = load_bench_model("preset:distilgpt2")
    assert (model.family, model.config.n_layer, model.config.n_embd) == ("gpt2", 6, 768)
    with pytest.raises(DistilleryError, match="preset"):
        load_bench_model("preset:gpt5")


def test_cli_json(tiny_gpt2_dir, capsys):
    code = main(["bench", str(tiny_gpt2_dir), "--dtype", "bf16", "--batch", "1", "--new-tokens", "2",
                 "--prompt-tokens", "3", "--forward-shape", "1x4", "--repeats", "1", "--no-reference", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    row = report["results"][0]
    assert (row["dtype"], row["layout"], set(row["decode"])) == ("bf16", "input-major", {"1"})


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "int4"], "--dtype 'int4'"),
    (["--batch", "one"], "--batch"),
    (["--batch", "0"], "--batch"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--forward-shape", "8by256"], "--forward-shape"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
    (["--device", "meta"], "the bench runs on cpu or cuda"),
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["preset:gpt5"], "Unknown preset 'gpt5'"),
])
def test_cli_bad_settings(tiny_gpt2_dir, capsys, flags, message):
    assert main(["bench", str(tiny_gpt2_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("distillery bench: error:") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu(tiny_gpt2_dir, capsys):
    assert main(["bench", str(tiny_gpt2_dir), "--device", "cuda"]) == 2
    assert "asks for CUDA but no CUDA device is available" in capsys.readouterr().err
