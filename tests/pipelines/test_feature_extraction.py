"""feature-extraction equals transformers' pipeline: nested lists (1, T, C) per text."""

from __future__ import annotations

import pytest
import torch
from conftest import copy_vocab, save_tiny_gpt2, save_tiny_roberta

from distillery.models import DistilleryError, load_model
from distillery.pipelines.feature_extraction import FeatureExtractionPipeline
from distillery.tokenizer import load_tokenizer

TEXTS = ["Replace me by any text you'd like.", "Hello, I’m a language model", "é 日本 🤗"]


def with_vocab(directory, shared_data, style):
    copy_vocab(shared_data, style, directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(shared_data, tmp_path_factory):
    directory = save_tiny_gpt2(tmp_path_factory.mktemp("fe") / "gpt2", vocab_size=50257)
    return with_vocab(directory, shared_data, "gpt2")


@pytest.fixture(scope="module")
def roberta_dir(shared_data, tmp_path_factory):
    directory = save_tiny_roberta(tmp_path_factory.mktemp("fe") / "roberta", vocab_size=50265)
    return with_vocab(directory, shared_data, "roberta")


def transformers_extractor(directory):
    import transformers
    from tokenizers import AddedToken

    model = transformers.AutoModel.from_pretrained(directory).eval()
    if model.config.model_type == "gpt2":
        tokenizer = transformers.GPT2Tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    else:
        tokenizer = transformers.RobertaTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                                  mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
    return transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer)


def assert_nested_close(ours, theirs):
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "roberta"])
def test_equals_transformers(family, gpt2_dir, roberta_dir):
    directory = gpt2_dir if family == "gpt2" else roberta_dir
    ours = FeatureExtractionPipeline(load_model(directory), load_tokenizer(directory))
    theirs = transformers_extractor(directory)
    single = ours(TEXTS[0])
    assert isinstance(single, list) and len(single) == 1 and isinstance(single[0][0][0], float)
    assert len(single[0][0]) == 32
    assert_nested_close(single, theirs(TEXTS[0]))
    batch = ours(TEXTS)
    expected = theirs(TEXTS)
    assert len(batch) == len(expected) == len(TEXTS)
    for a, b in zip(batch, expected):
        assert_nested_close(a, b)


def test_roberta_base_checkpoint(tmp_path, shared_data):
    directory = with_vocab(save_tiny_roberta(tmp_path / "base", "RobertaModel", vocab_size=50265), shared_data,
                           "roberta")
    model = load_model(directory)
    assert model.task == "base"
    ours = FeatureExtractionPipeline(model, load_tokenizer(directory))
    assert_nested_close(ours(TEXTS[1]), transformers_extractor(directory)(TEXTS[1]))


def test_return_tensors(gpt2_dir):
    ours = FeatureExtractionPipeline(load_model(gpt2_dir), load_tokenizer(gpt2_dir))
    tensor = ours(TEXTS[0], return_tensors=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 10, 32)
    assert tensor.tolist() == ours(TEXTS[0])


def test_too_long_text_refused_unless_truncated(gpt2_dir):
    ours = FeatureExtractionPipeline(load_model(gpt2_dir), load_tokenizer(gpt2_dir))
    text = " word" * 70  # the tiny model has 64 positions
    with pytest.raises(DistilleryError, match=r"The text is 70 tokens long but the model takes at most 64; "
                                              r"shorten it or pass truncation=True"):
        ours(text)
    assert len(ours(text, truncation=True)[0]) == 64
    assert len(ours(text, tokenize_kwargs={"truncation": True, "max_length": 10})[0]) == 10
    with pytest.raises(DistilleryError, match=r"got truncation both as an argument and in tokenize_kwargs"):
        ours(text, truncation=True, tokenize_kwargs={"truncation": True})


def test_empty_text(gpt2_dir):
    ours = FeatureExtractionPipeline(load_model(gpt2_dir), load_tokenizer(gpt2_dir))
    with pytest.raises(DistilleryError, match=r"The text encodes to no tokens"):
        ours("")
