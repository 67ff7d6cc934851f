"""`distillery generate / fill-mask / embed / info`: help, JSON output, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, copy_vocab, save_tiny_gpt2, save_tiny_roberta

from distillery.cli import main
from distillery.models import load_model
from distillery.pipelines import pipeline
from distillery.tokenizer import load_tokenizer

COMMANDS = ["generate", "fill-mask", "embed", "info"]


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    directory = save_tiny_gpt2(tmp_path_factory.mktemp("cli") / "gpt2", vocab_size=50257,
                               bos_token_id=50256, eos_token_id=50256)
    copy_vocab(shared_data, "gpt2", directory)
    return directory


@pytest.fixture(scope="module")
def roberta_dir(shared_data, tmp_path_factory):
    directory = save_tiny_roberta(tmp_path_factory.mktemp("cli") / "roberta", vocab_size=50265)
    copy_vocab(shared_data, "roberta", directory)
    return directory


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distillery {command}") and "MODEL" in out and "--json" in out


def test_generate_greedy_json(capsys, gpt2_dir):
    prompt = "Hello, I'm a language model"
    records = run_json(capsys, "generate", gpt2_dir, prompt, "--greedy", "--max-new-tokens", 6)
    expected = pipeline("text-generation", model=gpt2_dir)(prompt, do_sample=False, max_new_tokens=6)
    assert records == expected and len(records) == 1 and records[0]["generated_text"].startswith(prompt)


def test_generate_seeded_sampling_repeats(capsys, gpt2_dir):
    argv = ["generate", gpt2_dir, "The White man worked as a", "--do-sample", "--max-length", 12, "--seed", 48,
            "--num-return-sequences", 3, "--top-k", 50, "--no-full-text"]
    records = run_json(capsys, *argv)
    assert len(records) == 3 and not any(r["generated_text"].startswith("The White man") for r in records)
    code, out, _ = run(capsys, *argv)  # the same seed again, printed as text
    expected = "".join(f"--- {i + 1} ---\n{r['generated_text']}\n" for i, r in enumerate(records))
    assert code == 0 and out == expected


def test_generate_stop(capsys, gpt2_dir):
    full = run_json(capsys, "generate", gpt2_dir, "a", "--greedy", "--max-new-tokens", 8, "--no-full-text")
    stop = full[0]["generated_text"][3:6]
    cut = run_json(capsys, "generate", gpt2_dir, "a", "--greedy", "--max-new-tokens", 8, "--no-full-text",
                   "--stop", stop)
    assert cut[0]["generated_text"] == full[0]["generated_text"][: full[0]["generated_text"].find(stop)]


def test_fill_mask_json_and_text(capsys, roberta_dir):
    text = "The man worked as a <mask>."
    result = run_json(capsys, "fill-mask", roberta_dir, text, "--top-k", 3)
    expected = pipeline("fill-mask", model=roberta_dir)(text, top_k=3)
    assert [r["token"] for r in result] == [r["token"] for r in expected]
    assert result[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-6)
    targeted = run_json(capsys, "fill-mask", roberta_dir, text, "--targets", " waiter", " nurse")
    assert {r["token_str"] for r in targeted} == {" waiter", " nurse"}
    code, out, _ = run(capsys, "fill-mask", roberta_dir, "The <mask> worked as a <mask>.", "--top-k", 2)
    lines = out.splitlines()
    assert code == 0 and lines[0] == "mask 1:" and lines[3] == "mask 2:" and len(lines) == 6


EMBED_KEYS = {"model", "texts", "output_value", "pooling", "normalized", "dimensions", "embeddings", "tokens",
              "token_embeddings"}


@pytest.mark.parametrize("family", ["gpt2", "roberta"])
def test_embed_json(capsys, family, gpt2_dir, roberta_dir):
    directory = gpt2_dir if family == "gpt2" else roberta_dir
    texts = ["Replace me by any text you'd like.", "Another one."]
    result = run_json(capsys, "embed", directory, *texts)
    assert set(result) == EMBED_KEYS and result["output_value"] == "token_embeddings"
    assert (result["texts"], result["pooling"], result["embeddings"], result["dimensions"]) == (texts, None, None, 32)
    model = load_model(directory)
    encoder = getattr(model, "roberta", model)
    for text, tokens, features in zip(texts, result["tokens"], result["token_embeddings"]):
        ids = load_tokenizer(directory).encode(text)
        assert len(tokens) == len(features) == len(ids)
        with torch.no_grad():
            expected = encoder(torch.tensor([ids])).last_hidden_state[0]
        torch.testing.assert_close(torch.tensor(features), expected, atol=1e-5, rtol=0)
    code, out, _ = run(capsys, "embed", directory, *texts)
    assert code == 0 and out.startswith(f"{texts[0]!r}: ") and " tokens x 32 dimensions" in out


def test_embed_json_has_one_shape(capsys, roberta_dir):
    """Sentence output has the keys per-token output has, with the per-token ones null."""
    result = run_json(capsys, "embed", roberta_dir, "One text.", "--pooling", "mean", "--normalize")
    assert set(result) == EMBED_KEYS and result["output_value"] == "sentence_embedding"
    assert (result["pooling"], result["normalized"], result["tokens"], result["token_embeddings"]) == \
        ("mean", True, None, None)
    assert len(result["embeddings"]) == 1 and len(result["embeddings"][0]) == result["dimensions"] == 32
    code, out, _ = run(capsys, "embed", roberta_dir, "One text.", "--pooling", "mean")
    assert code == 0 and out.startswith("1 text x 32 dimensions (mean pooling)")


def test_embed_truncation(capsys, gpt2_dir):
    result = run_json(capsys, "embed", gpt2_dir, " word" * 70, "--truncation")
    assert len(result["token_embeddings"][0]) == 64 and len(result["tokens"][0]) == 64


def test_info_gpt2(capsys, gpt2_dir):
    import transformers

    info = run_json(capsys, "info", gpt2_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    assert info["parameters"] == theirs.num_parameters()
    assert (info["family"], info["task"], info["architecture"]) == ("gpt2", "causal-lm", "GPT2LMHeadModel")
    assert (info["layers"], info["hidden_size"], info["heads"], info["intermediate_size"]) == (2, 32, 4, 128)
    assert (info["vocab_size"], info["positions"], info["dtype"]) == (50257, 64, "float32")
    assert info["file_size_bytes"] == (gpt2_dir / "model.safetensors").stat().st_size
    assert info["tokenizer"] == {"style": "gpt2", "vocab_size": 50257}
    code, out, _ = run(capsys, "info", gpt2_dir)
    assert code == 0 and "parameters" in out and "gpt2 / causal-lm" in out


def test_info_roberta_bf16_without_tokenizer(capsys, tmp_path):
    import transformers

    directory = save_tiny_roberta(tmp_path / "r", "RobertaForSequenceClassification", num_labels=3)
    transformers.RobertaForSequenceClassification.from_pretrained(directory, dtype=torch.bfloat16) \
        .save_pretrained(tmp_path / "bf16")
    info = run_json(capsys, "info", tmp_path / "bf16")
    theirs = transformers.RobertaForSequenceClassification.from_pretrained(directory)
    assert info["parameters"] == theirs.num_parameters()
    assert (info["task"], info["positions"], info["dtype"], info["tokenizer"]) == \
        ("sequence-classification", 64, "bfloat16", None)


# ----------------------------------------------------------------------------------------------
# A user's mistake: exit 2, one line on stderr, no traceback


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_missing_model_folder(capsys, tmp_path):
    for command in COMMANDS:
        extra = ["text <mask>"] if command != "info" else []
        code, out, err = run(capsys, command, tmp_path / "no" / "such" / "model", *extra)
        assert_one_line_error(code, err, f"distillery {command}: error: No such model folder")
        assert out == ""


def test_fill_mask_errors(capsys, roberta_dir, gpt2_dir):
    code, _, err = run(capsys, "fill-mask", roberta_dir, "No mask here.")
    assert_one_line_error(code, err, "No mask token (<mask>) in the fill-mask text 'No mask here.'")
    code, _, err = run(capsys, "fill-mask", gpt2_dir, "The <mask>.")
    assert_one_line_error(code, err, "fill-mask needs a masked language model")
    code, _, err = run(capsys, "fill-mask", roberta_dir, "The <mask>.", "--top-k", 0)
    assert_one_line_error(code, err, "argument --top-k: must be a whole number of at least 1, not '0'.")
    long_text = "The <mask> sat." + " word" * 70
    code, _, err = run(capsys, "fill-mask", roberta_dir, long_text)
    assert_one_line_error(code, err, "(--truncation on the command line)")
    assert run(capsys, "fill-mask", roberta_dir, long_text, "--truncation")[0] == 0
    code, _, err = run(capsys, "embed", roberta_dir, long_text)
    assert_one_line_error(code, err, "(--truncation on the command line)")


def test_generate_errors(capsys, gpt2_dir, roberta_dir):
    code, _, err = run(capsys, "generate", gpt2_dir, "Hi", "--top-p", 1.5)
    assert_one_line_error(code, err, "argument --top-p: must be a number from 0 to 1, 0 excluded, not '1.5'.")
    code, _, err = run(capsys, "generate", roberta_dir, "Hi")
    assert_one_line_error(code, err, "text-generation needs a causal language model")
    code, _, err = run(capsys, "generate", gpt2_dir, "Hi", "--device", "cuda:0")
    if not torch.cuda.is_available():
        assert_one_line_error(code, err, "asks for CUDA but no CUDA device is available")
    code, _, err = run(capsys, "generate", gpt2_dir, "Hi", "--device", "toaster")
    assert_one_line_error(code, err, "argument --device: 'toaster' is not a torch device")


def test_info_errors(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, _, err = run(capsys, "info", tmp_path)
    assert_one_line_error(code, err, "model_type 't5' is not supported")
    (tmp_path / "config.json").unlink()
    code, _, err = run(capsys, "info", tmp_path)
    assert_one_line_error(code, err, "has no config.json")
    (tmp_path / "model").mkdir()  # a training run's folder: the model is in model/
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run(capsys, "info", tmp_path)
    assert_one_line_error(code, err, f"holds a trained model; pass {tmp_path / 'model'} instead")


def test_console_entry_point_exit_code(tmp_path):
    """Through a real process: a DistilleryError exits 2 with one line and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "distillery.cli", "info", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "distillery info: error:", "has no config.json")


def test_argparse_usage_error_exits_2(capsys):
    code, _, err = run(capsys, "fill-mask")
    assert_one_line_error(code, err, "the following arguments are required: MODEL, TEXT")


@pytest.mark.parametrize("argv, message", [
    (["generate", "MODEL", "x", "--bogus"], "distillery generate: error: unrecognized option --bogus; "
                                            "see distillery generate --help."),
    (["tokenizer", "train", ROOT / "README.md", "--vocab-size", "300", "--out", "tok", "--bogus", "--other"],
     "distillery tokenizer train: error: unrecognized options --bogus --other; see distillery tokenizer train --help."),
    (["eval", "perplexity", "MODEL", "--data", ROOT / "README.md", "--bogus"],
     "distillery eval perplexity: error: unrecognized option --bogus; see distillery eval perplexity --help."),
    (["info", "MODEL", "extra"], "distillery info: error: unexpected argument extra; see distillery info --help."),
])
def test_an_unknown_option_names_its_command(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, message)
    assert out == ""


@pytest.mark.parametrize("draft_flags", [("--draft-k", "3"), ("--draft-dtype", "int8")])
def test_generate_with_draft_equals_the_target_alone(capsys, gpt2_dir, tmp_path, draft_flags):
    draft = save_tiny_gpt2(tmp_path / "draft", vocab_size=50257, seed=7, n_layer=1)
    argv = ("generate", gpt2_dir, "Hello there", "--max-new-tokens", "10", "--greedy")
    alone = run_json(capsys, *argv)[0]["generated_text"]
    [speculative] = run_json(capsys, *argv, "--draft", draft, *draft_flags)  # a list, as without --draft
    assert speculative["generated_text"] == alone
    assert 0.0 <= speculative["acceptance_rate"] <= 1.0 and speculative["target_passes"] >= 1


def test_generate_compiled_equals_eager(capsys, gpt2_dir):
    argv = ("generate", gpt2_dir, "Hello there", "--max-new-tokens", "6", "--greedy")
    assert run_json(capsys, *argv, "--compile") == run_json(capsys, *argv)
    code, out, err = run(capsys, *argv, "--compile", "--dtype", "int8")
    assert_one_line_error(code, err, "torch.compile makes int8 decoding slower")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_generate_cuda_graphs_need_a_gpu(capsys, gpt2_dir):
    code, out, err = run(capsys, "generate", gpt2_dir, "Hi", "--cuda-graphs")
    assert_one_line_error(code, err, "CUDA graphs need the model on a CUDA GPU")
    assert out == ""
    code, out, err = run(capsys, "generate", gpt2_dir, "Hi", "--draft", gpt2_dir, "--compile")
    assert_one_line_error(code, err, "--draft does not support --compile")


def test_generate_draft_k_must_be_positive(capsys, gpt2_dir):
    code, out, err = run(capsys, "generate", gpt2_dir, "Hi", "--draft", gpt2_dir, "--draft-k", "0")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "argument --draft-k: must be a whole number of at least 1" in err


def test_generate_draft_refuses_several_sequences(capsys, gpt2_dir):
    code, out, err = run(capsys, "generate", gpt2_dir, "Hi", "--draft", gpt2_dir, "--do-sample",
                         "--num-return-sequences", "2")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--num-return-sequences" in err


def test_generate_int8_weights(capsys, gpt2_dir):
    full = run_json(capsys, "generate", gpt2_dir, "Hello", "--max-new-tokens", "5", "--greedy")
    int8 = run_json(capsys, "generate", gpt2_dir, "Hello", "--max-new-tokens", "5", "--greedy", "--dtype", "int8")
    assert int8[0]["generated_text"].startswith("Hello") and len(int8) == len(full) == 1


# A command whose output outlives its reader, as in `distillery ... | head`.
LONG_OUTPUT_COMMAND = """
import sys
from distillery import cli

class Args:
    command = "long"
    @staticmethod
    def func(args):
        for _ in range(100_000):
            print("x" * 100)

cli.build_parser = lambda: type("Parser", (), {"parse_known_args": lambda self, argv: (Args, [])})()
sys.exit(cli.main([]))
"""


def test_a_closed_pipe_ends_the_command_quietly():
    proc = subprocess.Popen([sys.executable, "-c", LONG_OUTPUT_COMMAND], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away mid-output
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
