"""fill-mask equals transformers' FillMaskPipeline on a tiny random RoBERTa with the real vocabulary."""

from __future__ import annotations

import pytest
import torch
from conftest import copy_vocab, save_tiny_roberta

from distillery.models import DistilleryError, load_model
from distillery.pipelines.fill_mask import FillMaskPipeline
from distillery.tokenizer import load_tokenizer

CARD_TEXTS = ["Hello I'm a <mask> model.", "The man worked as a <mask>.", "The woman worked as a <mask>."]


@pytest.fixture(scope="module")
def roberta_dir(shared_data, tmp_path_factory):
    """A tiny random RobertaForMaskedLM over the real 50,265-token vocabulary, with its tokenizer files."""
    directory = save_tiny_roberta(tmp_path_factory.mktemp("fill-mask") / "tiny", vocab_size=50265)
    copy_vocab(shared_data, "roberta", directory)
    return directory


@pytest.fixture(scope="module")
def ours(roberta_dir):
    return FillMaskPipeline(load_model(roberta_dir), load_tokenizer(roberta_dir))


@pytest.fixture(scope="module")
def theirs(roberta_dir):
    import transformers
    from tokenizers import AddedToken

    # The real roberta-base tokenizer's <mask> absorbs the space before it; vocab.json alone does not say so.
    tokenizer = transformers.RobertaTokenizer(
        str(roberta_dir / "vocab.json"), str(roberta_dir / "merges.txt"),
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
    )
    model = transformers.RobertaForMaskedLM.from_pretrained(roberta_dir).eval()
    return transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)


def assert_same_predictions(ours, theirs):
    """Same nesting, tokens, strings and sequences; scores within 1e-5."""
    assert type(ours) is type(theirs) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, list):
            assert_same_predictions(a, b)
            continue
        assert set(a) == {"score", "token", "token_str", "sequence"}
        assert (a["token"], a["token_str"], a["sequence"]) == (b["token"], b["token_str"], b["sequence"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_card_example_equals_transformers(ours, theirs):
    result = ours(CARD_TEXTS[0])
    assert len(result) == 5 and all(isinstance(p["score"], float) for p in result)
    assert all(p["sequence"] == f"Hello I'm a{p['token_str']} model." for p in result)
    assert_same_predictions(result, theirs(CARD_TEXTS[0]))


def test_list_of_texts_equals_transformers(ours, theirs):
    # Texts of different lengths are padded into one batch here; transformers runs them one by one.
    texts = [*CARD_TEXTS, "A much longer sentence, with several words before the <mask> appears in it."]
    result = ours(texts)
    assert len(result) == len(texts)
    assert_same_predictions(result, theirs(texts))


def test_list_of_one_text_gives_that_texts_result(ours, theirs):
    assert_same_predictions(ours([CARD_TEXTS[1]]), theirs([CARD_TEXTS[1]]))
    assert ours([CARD_TEXTS[1]]) == ours(CARD_TEXTS[1])


def test_several_masks_give_a_list_per_mask(ours, theirs):
    text = "The <mask> worked as a <mask> in <mask>."
    result = ours(text, top_k=3)
    assert len(result) == 3 and all(len(row) == 3 for row in result)
    assert result[0][0]["sequence"].startswith("<s>")  # special tokens are kept with several masks
    assert_same_predictions(result, theirs(text, top_k=3))


def test_targets_equal_transformers(ours, theirs):
    # "Ġnurse" is a vocabulary entry; " waiter" and "zzyzxq" are not and fall back to their first token.
    targets = [" waiter", "Ġnurse", "waitress", "zzyzxq", "Ġnurse"]
    result = ours(CARD_TEXTS[1], targets=targets)
    assert len(result) == 4  # duplicates counted once; top_k capped at the number of targets
    assert_same_predictions(sorted(result, key=lambda p: -p["score"]), theirs(CARD_TEXTS[1], targets=targets))
    assert_same_predictions(ours(CARD_TEXTS[1], targets="Ġnurse"), theirs(CARD_TEXTS[1], targets="Ġnurse"))


def test_top_k(ours, theirs):
    assert_same_predictions(ours(CARD_TEXTS[2], top_k=12), theirs(CARD_TEXTS[2], top_k=12))
    assert len(ours(CARD_TEXTS[2], top_k=1)) == 1


def test_lm_head_runs_only_at_mask_positions(ours):
    rows_seen = []
    hook = ours.model.lm_decoder.register_forward_hook(lambda m, inputs, out: rows_seen.append(inputs[0].shape))
    try:
        ours(["The <mask> worked as a <mask>.", CARD_TEXTS[0]])
    finally:
        hook.remove()
    assert rows_seen == [torch.Size([3, ours.model.config.hidden_size])]


def test_text_without_mask_names_the_mask_token(ours):
    with pytest.raises(DistilleryError, match=r"No mask token \(<mask>\) in the fill-mask text 'The man worked "
                                              r"as a doctor\.'; put <mask> where the word to predict goes"):
        ours(["The man worked as a <mask>.", "The man worked as a doctor."])


def test_too_long_text_is_refused_or_truncated(ours):
    text = "<mask> " + "word " * 80  # the tiny model takes 64 tokens
    with pytest.raises(DistilleryError, match=r"is 84 tokens long but the model takes at most 64; shorten it or "
                                              r"pass tokenizer_kwargs=\{'truncation': True\}"):
        ours(text)
    assert len(ours(text, tokenizer_kwargs={"truncation": True})) == 5


@pytest.mark.parametrize("top_k", [0, -1, 2.5, True])
def test_bad_top_k(ours, top_k):
    with pytest.raises(DistilleryError, match=r"fill-mask top_k must be a positive integer"):
        ours(CARD_TEXTS[0], top_k=top_k)


def test_targets_that_encode_to_nothing(ours):
    with pytest.raises(DistilleryError, match=r"None of the fill-mask targets \[''\] can be encoded"):
        ours(CARD_TEXTS[0], targets=[""])


def test_gpt2_model_is_refused(tiny_gpt2_dir, roberta_dir):
    with pytest.raises(DistilleryError, match=r"fill-mask needs a masked language model .* but this is a gpt2 "
                                              r"causal-lm model; use text-generation for GPT-2 models"):
        FillMaskPipeline(load_model(tiny_gpt2_dir), load_tokenizer(roberta_dir))


def test_tokenizer_without_mask_is_refused(roberta_dir, shared_data, tmp_path):
    copy_vocab(shared_data, "gpt2", tmp_path)
    with pytest.raises(DistilleryError, match=r"The gpt2 tokenizer has no mask token"):
        FillMaskPipeline(load_model(roberta_dir), load_tokenizer(tmp_path))
