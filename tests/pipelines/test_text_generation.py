"""The text-generation pipeline against transformers' on the same tiny weights and the real GPT-2 vocabulary."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import copy_vocab, save_tiny_gpt2, save_tiny_roberta
from torch import nn

from distillery.models import DistilleryError, ModelOutput, load_model
from distillery.pipelines import pipeline, set_seed
from distillery.pipelines.text_generation import (
    TextGenerationPipeline,
    checkpoint_generation_defaults,
    cut_at_stop,
    stop_prefix_length,
)
from distillery.tokenizer import load_tokenizer
from distillery.tokenizer.streaming import byte_level_alphabet

CARD_PROMPT = "Hello, I’m a language model"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, shared_data):
    """A tiny random GPT-2 (64 positions) over the real 50,257-token vocabulary, with its tokenizer files."""
    directory = save_tiny_gpt2(tmp_path_factory.mktemp("textgen") / "tiny-gpt2", vocab_size=50257)
    copy_vocab(shared_data, "gpt2", directory)
    return directory


@pytest.fixture(scope="module")
def generators(gpt2_dir):
    import transformers

    return pipeline("text-generation", model=gpt2_dir), transformers.pipeline("text-generation", model=str(gpt2_dir))


def run_both(generators, *args, seed=42, **kwargs):
    import transformers

    ours, theirs = generators
    transformers.set_seed(seed)
    expected = theirs(*args, **kwargs)
    set_seed(seed)
    return ours(*args, **kwargs), expected


def test_model_card_call_equals_transformers(generators):
    got, expected = run_both(generators, CARD_PROMPT, max_length=20, num_return_sequences=5)
    assert got == expected
    assert len(got) == 5 and all(r["generated_text"].startswith(CARD_PROMPT) for r in got)


@pytest.mark.parametrize(("prompt", "settings"), [
    ("Hello", dict(max_new_tokens=12, do_sample=False)),
    ("The White man worked as a", dict(max_length=20, num_return_sequences=3, seed=48)),
    ("Once upon a time", dict(max_new_tokens=12, top_k=5, temperature=1.3)),
    ("Once upon a time", dict(max_new_tokens=12, top_k=0, top_p=0.9, num_return_sequences=2)),
    ("Once upon a time", dict(max_new_tokens=12, repetition_penalty=1.5, return_full_text=False)),
    (["Hello", "A much longer prompt, with more words in it", "x"], dict(max_new_tokens=8, num_return_sequences=2)),
    ("", dict(max_new_tokens=8)),
    ("日本語のテキスト 🎉 and émojis", dict(max_new_tokens=8)),
], ids=["greedy", "card-48", "top-k-temperature", "top-p", "repetition-new-text", "list", "empty", "cjk-emoji"])
def test_outputs_equal_transformers(generators, prompt, settings):
    got, expected = run_both(generators, prompt, **settings)
    assert got == expected


def test_defaults_follow_transformers(generators):
    ours, _ = generators
    config = ours.generation_config()
    assert (config.max_new_tokens, config.do_sample, config.temperature, config.top_k) == (256, True, 0.7, 50)
    assert (config.eos_token_id, config.pad_token_id) == (50256, 50256)
    assert ours.generation_config(max_length=20).max_new_tokens is None
    assert ours.generation_config(do_sample=False).temperature == 1.0  # sampling defaults only when sampling


def test_checkpoint_generation_config_takes_precedence(gpt2_dir, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_length": 30,
                                                                 "_from_model_config": True}))
    model = load_model(gpt2_dir)
    defaults = checkpoint_generation_defaults(model, tmp_path)
    assert defaults == {"do_sample": False, "max_length": 30}
    config = TextGenerationPipeline(model, load_tokenizer(gpt2_dir), generation_defaults=defaults).generation_config()
    assert (config.do_sample, config.max_length, config.max_new_tokens, config.temperature) == (False, 30, None, 1.0)


def test_arguments_given_at_construction_apply_to_every_call(gpt2_dir):
    generator = pipeline("text-generation", model=gpt2_dir, max_new_tokens=3, do_sample=False)
    assert generator.generation_config().max_new_tokens == 3
    assert generator.generation_config(max_new_tokens=5).max_new_tokens == 5


def test_set_seed_reproduces_and_seeds_every_generator(generators):
    ours, _ = generators
    set_seed(3)
    first = (ours("Hello", max_new_tokens=10), random.random(), np.random.rand())
    set_seed(3)
    assert (ours("Hello", max_new_tokens=10), random.random(), np.random.rand()) == first


def test_stop_strings_cut_exactly_there(generators):
    ours, _ = generators
    text = ours("Hello", max_new_tokens=30, do_sample=False, return_full_text=False)[0]["generated_text"]
    stop = text[12:15]
    first = text.find(stop)
    cut = ours("Hello", max_new_tokens=30, do_sample=False, stop=[stop, "never there"])
    assert cut == [{"generated_text": "Hello" + text[:first]}]
    streamed = "".join(ours.stream("Hello", max_new_tokens=30, do_sample=False, stop=stop))
    assert streamed == text[:first]
    assert ours("Hello", max_new_tokens=30, do_sample=False, stop="never there")[0]["generated_text"] == "Hello" + text


def test_stream_pieces_join_to_the_generated_text(generators):
    ours, _ = generators
    set_seed(0)
    pieces = list(ours.stream("Hello", max_new_tokens=20))
    set_seed(0)
    assert "".join(pieces) == ours("Hello", max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    assert len(pieces) > 1


class ScriptedModel(nn.Module):
    """A fake causal LM that generates a fixed list of tokens, then EOS."""

    family, task = "gpt2", "causal-lm"

    def __init__(self, script: list[int], vocab_size: int = 50257) -> None:
        super().__init__()
        self.script = script
        self.config = SimpleNamespace(vocab_size=vocab_size, n_positions=128, extra={})
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def new_cache(self, batch_size: int, max_length: int) -> SimpleNamespace:
        return SimpleNamespace(step=0)

    def forward(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        token = self.script[cache.step] if cache.step < len(self.script) else self.config.vocab_size - 1
        cache.step += 1
        logits = torch.zeros(input_ids.size(0), 1, self.config.vocab_size)
        logits[:, :, token] = 1.0
        return ModelOutput(logits=logits)


def test_stream_never_splits_emoji_or_cjk(gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    text = "日本語 🎉 naïve 👩‍💻!"
    char_of_byte = {b: c for c, b in byte_level_alphabet().items()}
    # One token per byte, so that every multi-byte character is split across tokens.
    script = tokenizer.convert_tokens_to_ids([char_of_byte[b] for b in text.encode("utf-8")])
    generator = TextGenerationPipeline(ScriptedModel(script), tokenizer)
    pieces = list(generator.stream("Hi", max_new_tokens=60, do_sample=False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert generator("Hi", max_new_tokens=60, do_sample=False) == [{"generated_text": "Hi" + text}]


def test_stop_string_helpers():
    assert cut_at_stop("one. two. three", [". t", "hree"]) == "one"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert stop_prefix_length("the end is ne", ["near", "x"]) == 2
    assert stop_prefix_length("the end", ["near"]) == 0


def test_prompt_too_long_is_refused_unless_truncated(generators):
    ours, _ = generators
    long_prompt = " ".join(["word"] * 80)  # 80 tokens; the model has 64 positions
    with pytest.raises(DistilleryError, match="80 tokens long but the model has only 64 positions; .*truncation=True"):
        ours(long_prompt, max_new_tokens=5)
    out = ours(long_prompt, max_new_tokens=5, do_sample=False, truncation=True)
    assert out[0]["generated_text"].startswith(long_prompt)
    # truncation keeps the end of the prompt: the last 64 - 5 tokens.
    end = ours.tokenizer.decode(ours.tokenizer.encode(long_prompt)[-59:])
    assert out == [{"generated_text": long_prompt + ours(end, max_new_tokens=5, do_sample=False,
                                                         return_full_text=False)[0]["generated_text"]}]
    with pytest.raises(DistilleryError, match="exceeds the model's 64 positions; ask for at most 60 new tokens"):
        ours("Hello there you all", max_new_tokens=61)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(do_sample=False, num_return_sequences=2), "num_return_sequences=2 needs sampling"),
    (dict(max_tokens=5), "unknown argument(s) ['max_tokens']"),
    (dict(max_length=3), "max_length (prompt + new tokens) is 3"),
    (dict(stop=[""]), "stop must be a non-empty string"),
])
def test_bad_settings_get_one_clear_sentence(generators, settings, message):
    ours, _ = generators
    with pytest.raises(DistilleryError) as e:
        ours("Hello there you all", **settings)
    assert message in str(e.value)


def test_bad_inputs_and_models(gpt2_dir, tiny_roberta_dir):
    generator = pipeline("text-generation", model=gpt2_dir)
    with pytest.raises(DistilleryError, match="takes a prompt string or a list of strings, got int"):
        generator(123)
    with pytest.raises(DistilleryError, match="Unknown pipeline task 'summarization'"):
        pipeline("summarization", model=gpt2_dir)
    with pytest.raises(DistilleryError, match="got a loaded model but no tokenizer"):
        pipeline("text-generation", model=load_model(gpt2_dir))
    with pytest.raises(DistilleryError, match="text-generation needs a causal language model"):
        TextGenerationPipeline(load_model(tiny_roberta_dir), load_tokenizer(gpt2_dir))


def test_loaded_model_and_tokenizer_folder(gpt2_dir):
    generator = pipeline("text-generation", model=load_model(gpt2_dir), tokenizer=gpt2_dir)
    out = generator(["a", "b"], max_new_tokens=3, do_sample=False)
    assert [len(r) for r in out] == [1, 1] and out[0][0]["generated_text"].startswith("a")


def test_pipeline_builds_every_task(tmp_path, shared_data, gpt2_dir):
    from distillery.pipelines.feature_extraction import FeatureExtractionPipeline
    from distillery.pipelines.fill_mask import FillMaskPipeline

    roberta_dir = save_tiny_roberta(tmp_path / "tiny-roberta", vocab_size=50265)
    copy_vocab(shared_data, "roberta", roberta_dir)
    unmasker = pipeline("fill-mask", model=roberta_dir)
    assert isinstance(unmasker, FillMaskPipeline) and len(unmasker("Hello I'm a <mask> model.", top_k=2)) == 2
    extractor = pipeline("feature-extraction", model=gpt2_dir)
    assert isinstance(extractor, FeatureExtractionPipeline)
    assert len(extractor("Hello world")[0]) == 2  # (1, T, C) nested lists
    assert isinstance(pipeline("text-generation", model=gpt2_dir), TextGenerationPipeline)


def test_batched_prompts_equal_prompt_by_prompt(generators):
    ours, _ = generators
    prompts = ["Hello", "A much longer prompt, with more words in it", "日本語 🎉", "x y"]
    one_by_one = ours(prompts, max_new_tokens=10, do_sample=False, repetition_penalty=1.2, stop="the")
    assert ours(prompts, max_new_tokens=10, do_sample=False, repetition_penalty=1.2, stop="the",
                batch_size=3) == one_by_one
    with pytest.raises(DistilleryError, match="batch_size must be a positive integer"):
        ours(prompts, batch_size=0)


@pytest.fixture(scope="module")
def distilgpt2_like_dir(tmp_path_factory, shared_data):
    """Tiny weights whose config.json carries distilgpt2's own text-generation settings."""
    directory = save_tiny_gpt2(tmp_path_factory.mktemp("card") / "tiny-distilgpt2", vocab_size=50257,
                               task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
    copy_vocab(shared_data, "gpt2", directory)
    return directory


def test_checkpoint_task_params_are_the_defaults_as_the_card_used_them(distilgpt2_like_dir):
    """distilgpt2's config.json asks for do_sample=True, max_length=50; transformers 4.x applied that
    (temperature 1.0, top_k 50) when the card's samples were made, so the card's call reproduces."""
    import transformers

    ours = pipeline("text-generation", model=distilgpt2_like_dir)
    config = ours.generation_config()
    assert (config.do_sample, config.max_length, config.temperature, config.top_k) == (True, 50, 1.0, 50)
    theirs = transformers.pipeline("text-generation", model=str(distilgpt2_like_dir))
    transformers.set_seed(42)
    expected = theirs(CARD_PROMPT, max_length=20, num_return_sequences=5, do_sample=True, temperature=1.0)
    set_seed(42)
    assert ours(CARD_PROMPT, max_length=20, num_return_sequences=5) == expected


def test_compile_keeps_linear_layers_for_torch_compile(gpt2_dir):
    """Without compile the head gets the CPU decode layout; with it, the layers stay nn.Linear so that
    torch.compile freezes the weights into its own kernels."""
    from distillery.generation.quantize import InferenceLinear

    assert isinstance(pipeline("text-generation", model=gpt2_dir).model.lm_head, InferenceLinear)
    assert type(pipeline("text-generation", model=gpt2_dir, compile=True).model.lm_head) is nn.Linear
