"""Token classification: CoNLL reading, conlleval-style entity scores, a tiny tagger that learns."""

from __future__ import annotations

import pytest
from conftest import copy_vocab, save_tiny_roberta

from distillery.evaluate import tasks
from distillery.evaluate.glue import FinetuneSettings
from distillery.models.common import DistilleryError


class WordPieceTokenizer:
    """One token per letter, so a word has several pieces and only its first carries the label."""

    bos_token_id, pad_token_id, eos_token_id = 0, 1, 2

    def encode(self, text, add_special_tokens=True):
        return [5 + ord(c) % 94 for c in text.strip()]


def test_read_conll(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    sentences = tasks.read_conll(path)
    assert [s.words for s in sentences] == [["EU", "rejects"], ["Peter"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O"], ["B-PER"]]
    assert tasks.tag_set(sentences) == ["O", "B-ORG", "B-PER"]
    path.write_text("lonely\n")
    with pytest.raises(DistilleryError, match="line 1 has no tag column"):
        tasks.read_conll(path)


def test_entities_iob1_and_iob2():
    assert tasks.entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert tasks.entities(["I-PER", "I-PER", "I-LOC", "B-LOC", "I-LOC"]) == {("PER", 0, 2), ("LOC", 2, 3), ("LOC", 3, 5)}


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]  # 2 of 3 found right, 3 found
    scores = tasks.entity_scores(predicted, gold)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(4 / 6)


def test_tagger_learns_a_pattern(tmp_path):
    model_dir = save_tiny_roberta(tmp_path / "r")
    train = [tasks.TaggedSentence(["Paris", "is", "big"], ["B-LOC", "O", "O"]),
             tasks.TaggedSentence(["we", "saw", "Paris"], ["O", "O", "B-LOC"])] * 8
    tags = tasks.tag_set(train)
    model = tasks.load_tagger(model_dir, tags)
    settings = FinetuneSettings(epochs=6, batch_size=8, learning_rate=5e-3, max_length=32, warmup_ratio=0.0)
    result = tasks.finetune_tagger(model, WordPieceTokenizer(), train, train[:2], tags, settings, progress=False)
    assert result["metrics"]["dev"]["f1"] == 1.0
    assert model.config.num_labels == 2


# ----------------------------------------------------------------------------------------------
# Question answering


@pytest.fixture(scope="module")
def roberta_with_vocab(tmp_path_factory, shared_data):

    model_dir = save_tiny_roberta(tmp_path_factory.mktemp("qa") / "r", vocab_size=50265, hidden_size=16,
                                  num_attention_heads=2)
    copy_vocab(shared_data, "roberta", model_dir)
    return model_dir


def _squad(tmp_path):
    context = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
               "a region in France. They were descended from Norse raiders and pirates from Denmark.")
    data = {"data": [{"title": "Normans", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "In what country is Normandy located?",
         "answers": [{"text": "France", "answer_start": context.index("France")}]},
        {"id": "q2", "question": "Where did the raiders come from?",
         "answers": [{"text": "Denmark", "answer_start": context.index("Denmark")},
                     {"text": "from Denmark", "answer_start": context.index("from Denmark")}]},
    ]}]}]}
    import json

    (tmp_path / "squad.json").write_text(json.dumps(data))
    return tmp_path / "squad.json"


def test_windows_overlap_and_hold_the_answer(tmp_path, roberta_with_vocab):
    from distillery.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(roberta_with_vocab)
    examples = tasks.read_squad(_squad(tmp_path))
    windows = tasks.qa_windows(tokenizer, examples, max_length=32, doc_stride=8)
    assert len({w.example for w in windows}) == 2 and len(windows) > 2
    assert all(len(w.ids) <= 32 for w in windows)
    holding = [w for w in windows if w.start]
    assert holding and all(tokenizer.decode(w.ids[w.start:w.end + 1]).strip() == examples[w.example].answers[0]
                           for w in holding)
    first, second = [w for w in windows if w.example == 0][:2]
    assert first.offsets[-8:] == second.offsets[:8]  # doc_stride tokens shared


def test_predictions_from_logits_at_the_gold_span(tmp_path, roberta_with_vocab, monkeypatch):
    import torch

    from distillery.models import load_model
    from distillery.models.common import ModelOutput
    from distillery.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(roberta_with_vocab)
    examples = tasks.read_squad(_squad(tmp_path))
    windows = tasks.qa_windows(tokenizer, examples, max_length=48, doc_stride=16)
    model = load_model(roberta_with_vocab, task="question-answering")
    gold = {tuple(w.ids): (w.start, w.end) for w in windows}

    def oracle(ids, attention_mask=None):
        logits = torch.zeros(*ids.shape, 2)
        for row, seq in enumerate(ids.tolist()):
            s, e = next(v for k, v in gold.items() if list(k) == seq[:len(k)])
            if s:
                logits[row, s, 0] = logits[row, e, 1] = 10.0
        return ModelOutput(logits=logits)

    monkeypatch.setattr(model, "forward", oracle)
    predictions = tasks.predict_answers(model, tokenizer, examples, windows, batch_size=3)
    assert predictions == {"q1": "France", "q2": "Denmark"}
    assert tasks.squad_scores(predictions, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_scores_by_hand():
    examples = [tasks.QAExample("a", "q", "c", ["the Eiffel Tower"], 0), tasks.QAExample("b", "q", "c", ["Paris"], 0)]
    scores = tasks.squad_scores({"a": "Eiffel Tower!", "b": "in Paris France"}, examples)
    # a: exact after normalisation; b: precision 1/3, recall 1 -> F1 0.5
    assert scores == {"exact_match": 50.0, "f1": pytest.approx(75.0)}


def test_qa_finetuning_runs(tmp_path, roberta_with_vocab):
    from distillery.models import load_model
    from distillery.tokenizer import load_tokenizer

    examples = tasks.read_squad(_squad(tmp_path))
    model = load_model(roberta_with_vocab, task="question-answering")
    settings = FinetuneSettings(epochs=1, batch_size=4, learning_rate=1e-3, max_length=48)
    result = tasks.finetune_qa(model, load_tokenizer(roberta_with_vocab), examples, examples, settings,
                               doc_stride=16, progress=False)
    dev = result["metrics"]["dev"]
    assert result["train_windows"] >= 2 and 0 <= dev["exact_match"] <= dev["f1"] <= 100


def test_bad_squad_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"data": [{"paragraphs": [{"context": "x", "qas": [{"id": 1}]}]}]}')
    with pytest.raises(DistilleryError, match="not in SQuAD's layout"):
        tasks.read_squad(tmp_path / "bad.json")
