"""GLUE, token classification and question answering on tiny random BERT and DistilBERT models with
the real uncased WordPiece vocabulary: pairs framed and typed as transformers' tokenizer does them,
logits equal to transformers' on the same batch, and each task running end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_bert_vocab, save_tiny_bert, save_tiny_gpt2

from distillery.cli import main
from distillery.evaluate import glue, tasks
from distillery.models import DistilleryError, load_model
from distillery.tokenizer import load_tokenizer

VOCAB = 30522
PAIRS = [("A man is playing a guitar.", "Someone plays an instrument, loudly!"),
         ("Café owners in Zürich", "were unaffable."),
         ("short", "a much longer second sentence with many more words in it than the first")]


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    return load_tokenizer(copy_bert_vocab(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def hf_tokenizer(bert_tokenizer, tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("hf-vocab")
    return transformers.AutoTokenizer.from_pretrained(copy_bert_vocab(folder))


def tiny(tmp_path, cls_name: str):
    labels = 2 if cls_name.endswith("QuestionAnswering") else 3
    return copy_bert_vocab(save_tiny_bert(tmp_path / cls_name, cls_name, vocab_size=VOCAB, num_labels=labels))


# ----------------------------------------------------------------------------------------------
# Pairs as BERT frames them


def test_pairs_are_framed_and_typed_as_transformers_does(bert_tokenizer, hf_tokenizer):
    for a, b in PAIRS:
        ids = glue.encode_example(bert_tokenizer, (a, b), max_length=128)
        theirs = hf_tokenizer(a, b)
        assert ids == theirs["input_ids"]
        types = glue.token_types(torch.tensor([ids]), bert_tokenizer.sep_token_id)[0].tolist()
        assert types == theirs["token_type_ids"]
        assert glue.encode_example(bert_tokenizer, (a,), max_length=128) == hf_tokenizer(a)["input_ids"]
        # The same as the tokenizer's own pair call.
        assert ids == bert_tokenizer(a, b, return_tensors=None)["input_ids"]


def test_roberta_pairs_keep_their_layout(shared_data):
    roberta = load_tokenizer(shared_data / "tokenizers" / "roberta")
    for a, b in PAIRS:
        ids = glue.encode_example(roberta, (a, b), max_length=128)
        assert ids == roberta(a, b, return_tensors=None)["input_ids"]
        assert ids[0] == roberta.bos_token_id and ids.count(roberta.eos_token_id) == 3


def test_a_truncated_pair_keeps_both_separators(bert_tokenizer):
    ids = glue.encode_example(bert_tokenizer, PAIRS[2], max_length=12)
    sep = bert_tokenizer.sep_token_id
    assert len(ids) == 12 and ids[0] == bert_tokenizer.cls_token_id and ids[-1] == sep and ids.count(sep) == 2
    assert bert_tokenizer.decode(ids[1:ids.index(sep)]) == "short"  # the short text kept whole


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "DistilBertForSequenceClassification"])
def test_padded_pair_batch_equals_transformers(tmp_path, cls_name, bert_tokenizer, hf_tokenizer):
    import transformers

    directory = tiny(tmp_path, cls_name)
    ours = load_model(directory)
    theirs = getattr(transformers, cls_name).from_pretrained(directory).eval()
    encoded = [glue.encode_example(bert_tokenizer, pair, 64) for pair in PAIRS]
    with torch.no_grad():
        logits = glue.forward_padded(ours, bert_tokenizer, encoded, bert_tokenizer.pad_token_id).logits
        batch = hf_tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt")
        if cls_name.startswith("DistilBert"):
            batch.pop("token_type_ids")
        expected = theirs(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# GLUE end to end


def _write_rte(folder):
    folder.mkdir()
    rows = [("A man is playing a guitar.", "A man plays music.", 0),
            ("A cat sleeps on the mat.", "A dog is running in the park.", 1)] * 4
    for name in ("train.tsv", "dev.tsv"):
        lines = ["sentence1\tsentence2\tlabel\tidx"] + [f"{a}\t{b}\t{y}\t{i}" for i, (a, b, y) in enumerate(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForMaskedLM"])
def test_glue_command_fine_tunes_a_tiny_encoder(tmp_path, cls_name, capsys):
    directory = tiny(tmp_path, cls_name)
    code = main(["glue", "rte", str(directory), "--data", str(_write_rte(tmp_path / "RTE")), "--epochs", "8",
                 "--batch-size", "4", "--lr", "5e-3", "--max-length", "32", "--warmup-ratio", "0", "--json",
                 "--out", str(tmp_path / "finetuned")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 16 and result["metrics"]["dev"]["examples"] == 8
    assert result["metrics"]["dev"]["accuracy"] == 1.0  # two pairs, learned
    saved = load_model(tmp_path / "finetuned")
    assert (saved.family, saved.task, saved.config.num_labels) == (cls_name.lower()[:-len("ForMaskedLM")],
                                                                   "sequence-classification", 2)
    assert load_tokenizer(tmp_path / "finetuned").style == "bert"


def test_a_classifier_for_another_task_gets_a_new_head(tmp_path):
    model = glue.load_classifier(tiny(tmp_path, "DistilBertForSequenceClassification"), glue.get_task("sst2"))
    assert model.config.num_labels == 2 and sorted(model.newly_initialized) == [
        "cls_dense.bias", "cls_dense.weight", "cls_out.bias", "cls_out.weight"]
    bert = glue.load_classifier(tiny(tmp_path, "BertForSequenceClassification"), glue.get_task("stsb"))
    assert bert.config.problem_type == "regression" and "bert.pooler.weight" not in bert.newly_initialized


def test_a_causal_lm_is_refused(tmp_path):
    with pytest.raises(DistilleryError, match=r"GLUE fine-tuning needs an encoder checkpoint \(RoBERTa, BERT or "
                                              r"DistilBERT\), not a gpt2 model\."):
        glue.load_classifier(save_tiny_gpt2(tmp_path / "g"), glue.get_task("sst2"))
    with pytest.raises(DistilleryError, match="token classification needs an encoder checkpoint"):
        tasks.load_tagger(save_tiny_gpt2(tmp_path / "g2"), ["O", "B-LOC"])


# ----------------------------------------------------------------------------------------------
# Token classification and question answering


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForMaskedLM"])
def test_tagger_learns_a_pattern(tmp_path, cls_name, bert_tokenizer):
    train = [tasks.TaggedSentence(["Paris", "is", "unaffable"], ["B-LOC", "O", "O"]),
             tasks.TaggedSentence(["we", "saw", "Paris"], ["O", "O", "B-LOC"])] * 8
    tags = tasks.tag_set(train)
    model = tasks.load_tagger(tiny(tmp_path, cls_name), tags)
    settings = glue.FinetuneSettings(epochs=6, batch_size=8, learning_rate=5e-3, max_length=32, warmup_ratio=0.0)
    result = tasks.finetune_tagger(model, bert_tokenizer, train, train[:2], tags, settings, progress=False)
    assert result["metrics"]["dev"]["f1"] == 1.0


def test_a_word_wordpiece_drops_still_has_a_piece(bert_tokenizer):
    # A zero-width space is not whitespace to str.split but BERT's normaliser removes it.
    sentence = tasks.TaggedSentence(["Paris", "\u200b", "unaffable"], ["B-LOC", "O", "O"])
    ids, labels = tasks.encode_tagged(bert_tokenizer, sentence, {"O": 0, "B-LOC": 1}, max_length=32)
    assert ids[0] == bert_tokenizer.cls_token_id and ids[-1] == bert_tokenizer.sep_token_id
    assert bert_tokenizer.unk_token_id in ids and [lab for lab in labels if lab != tasks.IGNORE] == [1, 0, 0]


def _squad(tmp_path):
    context = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
               "a region in France. They were descended from Norse raiders and pirates from Denmark.")
    data = {"data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "In what country is Normandy located?",
         "answers": [{"text": "France", "answer_start": context.index("France")}]},
        {"id": "q2", "question": "Where did the raiders come from?",
         "answers": [{"text": "Denmark", "answer_start": context.index("Denmark")}]},
    ]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(data))
    return tasks.read_squad(tmp_path / "squad.json")


def test_qa_windows_are_bert_pairs(tmp_path, bert_tokenizer, hf_tokenizer):
    examples = _squad(tmp_path)
    whole = tasks.qa_windows(bert_tokenizer, examples, max_length=128, doc_stride=16)
    assert len(whole) == 2
    for window, example in zip(whole, examples):
        theirs = hf_tokenizer(example.question, example.context)
        assert window.ids == theirs["input_ids"]
        types = glue.token_types(torch.tensor([window.ids]), bert_tokenizer.sep_token_id)[0].tolist()
        assert types == theirs["token_type_ids"]
        assert bert_tokenizer.decode(window.ids[window.start:window.end + 1]) == example.answers[0].lower()
    windows = tasks.qa_windows(bert_tokenizer, examples, max_length=32, doc_stride=8)
    assert len(windows) > 2 and all(len(w.ids) <= 32 and w.ids[-1] == bert_tokenizer.sep_token_id for w in windows)
    holding = [w for w in windows if w.start]
    assert holding and all(bert_tokenizer.decode(w.ids[w.start:w.end + 1]) == examples[w.example].answers[0].lower()
                           for w in holding)


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForQuestionAnswering"])
def test_qa_fine_tuning_runs(tmp_path, cls_name, bert_tokenizer):
    examples = _squad(tmp_path)
    model = load_model(tiny(tmp_path, cls_name), task="question-answering")
    settings = glue.FinetuneSettings(epochs=1, batch_size=4, learning_rate=1e-3, max_length=40)
    result = tasks.finetune_qa(model, bert_tokenizer, examples, examples, settings, doc_stride=8, progress=False)
    dev = result["metrics"]["dev"]
    assert result["train_windows"] >= 2 and 0 <= dev["exact_match"] <= dev["f1"] <= 100


# ----------------------------------------------------------------------------------------------
# The model card of a BERT or DistilBERT folder


@pytest.mark.parametrize("cls_name,family", [("BertForMaskedLM", "BERT"), ("DistilBertForMaskedLM", "DistilBERT")])
def test_card_of_a_bert_family_folder(tmp_path, cls_name, family):
    directory = tiny(tmp_path, cls_name)
    out = tmp_path / "card" / "README.md"
    assert main(["card", str(directory), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"is a {family} model with 2 layers, hidden size 32 and 4 attention heads" in text
    assert f"**Architecture:** {cls_name}, context 40 positions, vocabulary 30,522" in text
    assert "masked language model" in text and "unmasker(\"Hello I'm a [MASK] model.\")" in text
