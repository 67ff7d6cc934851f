"""fill-mask and feature-extraction on tiny random BERT and DistilBERT models over the real uncased
WordPiece vocabulary (all-MiniLM-L6-v2's vocab.txt), equal to transformers' pipelines."""

from __future__ import annotations

import pytest
import torch
from conftest import copy_bert_vocab, save_tiny_bert

from distillery.models import DistilleryError, load_model
from distillery.pipelines import pipeline
from distillery.pipelines.fill_mask import FillMaskPipeline
from distillery.tokenizer import load_tokenizer

VOCAB = 30522
CLASSES = {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM"}
# Mixed case and accents (the uncased normaliser), a word WordPiece splits ("unaffable"), punctuation.
TEXTS = ["Hello I'm a [MASK] model.", "The man worked as a [MASK].",
         "Café owners in Zürich were unaffable, [MASK] said; it's true!"]


@pytest.fixture(scope="module", params=list(CLASSES))
def masked_lm_dir(request, tmp_path_factory):
    directory = save_tiny_bert(tmp_path_factory.mktemp(request.param) / "tiny", CLASSES[request.param],
                               vocab_size=VOCAB)
    return copy_bert_vocab(directory)


@pytest.fixture(scope="module")
def theirs(masked_lm_dir):
    import transformers

    model = transformers.AutoModelForMaskedLM.from_pretrained(masked_lm_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(masked_lm_dir)
    return transformers.pipeline("fill-mask", model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ours(masked_lm_dir):
    return pipeline("fill-mask", model=masked_lm_dir)


def assert_same_predictions(ours, theirs):
    """Same nesting, tokens, strings and sequences; scores within 1e-5."""
    assert type(ours) is type(theirs) and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, list):
            assert_same_predictions(a, b)
            continue
        assert (a["token"], a["token_str"], a["sequence"]) == (b["token"], b["token_str"], b["sequence"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_fill_mask_equals_transformers(ours, theirs):
    for text in TEXTS:
        result = ours(text, top_k=8)
        assert len(result) == 8 and all(p["sequence"] == p["sequence"].lower() for p in result)  # uncased
        assert_same_predictions(result, theirs(text, top_k=8))


def test_batch_several_masks_and_targets_equal_transformers(ours, theirs):
    # Texts of different lengths share one padded batch here; transformers runs them one by one.
    assert_same_predictions(ours(TEXTS), theirs(TEXTS))
    several = "The [MASK] worked as a [MASK] in [MASK]."
    result = ours(several, top_k=3)
    assert result[0][0]["sequence"].startswith("[CLS]")  # special tokens kept with several masks
    assert_same_predictions(result, theirs(several, top_k=3))
    # "nurse" is a vocabulary entry; "Nurse" is not (cased) and "unaffable" splits: their first tokens.
    targets = ["nurse", "Nurse", "unaffable", "##ing"]
    assert_same_predictions(sorted(ours(TEXTS[1], targets=targets), key=lambda p: -p["score"]),
                            theirs(TEXTS[1], targets=targets))


def test_wordpiece_tokens_are_decoded_as_transformers_does(ours, theirs):
    # Every token of the vocabulary as a candidate: "##" pieces, [unused], punctuation, CJK.
    ours_all, theirs_all = ours(TEXTS[0], top_k=VOCAB), theirs(TEXTS[0], top_k=VOCAB)
    pieces = [p for p in theirs_all if p["token_str"].startswith("##")]
    assert pieces and {p["token"] for p in ours_all} == set(range(VOCAB))
    by_token = {p["token"]: p for p in ours_all}
    for b in theirs_all[::7] + pieces[:200]:
        a = by_token[b["token"]]
        assert (a["token_str"], a["sequence"]) == (b["token_str"], b["sequence"])


def test_a_masked_lm_loaded_by_hand_runs_too(masked_lm_dir, theirs):
    unmasker = FillMaskPipeline(load_model(masked_lm_dir), load_tokenizer(masked_lm_dir))
    assert_same_predictions(unmasker(TEXTS[1]), theirs(TEXTS[1]))
    with pytest.raises(DistilleryError, match=r"No mask token \(\[MASK\]\) in the fill-mask text 'a <mask> b'"):
        unmasker("a <mask> b")


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "DistilBertForTokenClassification",
                                      "BertModel"])
def test_a_checkpoint_without_a_masked_lm_head_is_refused(tmp_path, cls_name):
    directory = copy_bert_vocab(save_tiny_bert(tmp_path / "m", cls_name, vocab_size=VOCAB))
    with pytest.raises(DistilleryError, match=r"holds a (distil)?bert [a-z-]+ model without a masked-LM head, so it "
                                              r"cannot fill masks; use fill-mask with a masked-LM checkpoint"):
        pipeline("fill-mask", model=directory)
    with pytest.raises(DistilleryError, match=r"fill-mask needs a masked language model .* but this is a "
                                              r"(distil)?bert [a-z-]+ model; load a checkpoint with a masked-LM head"):
        FillMaskPipeline(load_model(directory), load_tokenizer(directory))


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForSequenceClassification", "DistilBertForMaskedLM",
                                      "DistilBertForQuestionAnswering"])
def test_feature_extraction_equals_transformers(tmp_path, cls_name):
    import transformers

    directory = copy_bert_vocab(save_tiny_bert(tmp_path / "m", cls_name, vocab_size=VOCAB))
    ours = pipeline("feature-extraction", model=directory)
    theirs = transformers.pipeline("feature-extraction",
                                   model=transformers.AutoModel.from_pretrained(directory).eval(),
                                   tokenizer=transformers.AutoTokenizer.from_pretrained(directory))
    for text in [*TEXTS, "é 日本 🤗"]:
        a, b = torch.tensor(ours(text)), torch.tensor(theirs(text))
        assert a.shape == b.shape and a.shape[-1] == 32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    long_text = "word " * 60  # 62 tokens; the tiny models take 40
    with pytest.raises(DistilleryError, match="is 62 tokens long but the model takes at most 40"):
        ours(long_text)
    # transformers truncates to the tokenizer's 512, which this model cannot take: name its 40.
    cut = {"truncation": True, "max_length": 40}
    torch.testing.assert_close(torch.tensor(ours(long_text, truncation=True)),
                               torch.tensor(theirs(long_text, tokenize_kwargs=cut)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForSequenceClassification"])
def test_info_describes_a_bert_family_folder(tmp_path, cls_name, capsys):
    import json

    import transformers

    from distillery.cli import main

    directory = copy_bert_vocab(save_tiny_bert(tmp_path / "m", cls_name, vocab_size=VOCAB))
    assert main(["info", str(directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    theirs = getattr(transformers, cls_name).from_pretrained(directory)
    family = "distilbert" if cls_name.startswith("Distil") else "bert"
    assert (info["family"], info["architecture"], info["parameters"]) == (family, cls_name, theirs.num_parameters())
    assert (info["layers"], info["hidden_size"], info["heads"], info["intermediate_size"], info["positions"]) == \
        (2, 32, 4, 37, 40)
    assert info["tokenizer"] == {"style": "bert", "vocab_size": VOCAB}


def test_fill_mask_command_on_a_bert_folder(masked_lm_dir, theirs, capsys):
    import json

    from distillery.cli import main

    assert main(["fill-mask", str(masked_lm_dir), TEXTS[1], "--top-k", "3", "--json"]) == 0
    assert_same_predictions(json.loads(capsys.readouterr().out), theirs(TEXTS[1], top_k=3))
