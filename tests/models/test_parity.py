"""Parity with transformers on tiny random models: the spine of the suite.

Each test builds a tiny random model with transformers, saves it with save_pretrained, loads it
with distillery, and compares outputs (fp32, max abs diff <= 1e-4); then saves ours and loads it
back in transformers.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import save_tiny_gpt2, save_tiny_roberta

from distillery.models import GPT2, GPT2Config, RobertaConfig, load_model
from distillery.models.common import ConfigError

ATOL = 1e-4


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def left_padded(batch: int = 3, length: int = 12, vocab: int = 99, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# GPT-2


def test_gpt2_logits_and_hidden_states_match(tiny_gpt2_dir):
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ours = load_model(tiny_gpt2_dir)
    ids = torch.randint(0, 99, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(ids, output_hidden_states=True)
        b = ours(ids, output_hidden_states=True)
    assert_close(b.logits, a.logits)
    assert len(b.hidden_states) == len(a.hidden_states) == ours.config.n_layer + 1
    for x, y in zip(b.hidden_states, a.hidden_states):
        assert_close(x, y)


def test_gpt2_left_padded_batch_matches_and_equals_unpadded(tiny_gpt2_dir):
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ours = load_model(tiny_gpt2_dir)
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=positions).logits
        b = ours(ids, attention_mask=mask).logits
        alone = ours(ids[2:, 9:]).logits
    real = mask.bool()
    assert_close(b[real], a[real])
    assert_close(b[2, 9:], alone[0])


def test_gpt2_right_padded_batch_matches(tiny_gpt2_dir):
    ref = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    ours = load_model(tiny_gpt2_dir)
    ids, mask = left_padded()
    mask = mask.flip(-1)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    assert_close(b[mask.bool()], a[mask.bool()])


def test_gpt2_kv_cache_equals_full_forward(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    ids = torch.randint(0, 99, (2, 15), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :6], cache=cache).logits]  # prefill
        steps += [model(ids[:, 6:10], cache=cache).logits]  # a chunk onto a non-empty cache
        for t in range(10, 15):
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 15


def test_gpt2_logits_to_keep_computes_only_the_last_position(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    ids = torch.randint(0, 99, (1, 9))
    with torch.no_grad():
        last = model(ids, logits_to_keep=1).logits
        full = model(ids).logits
    assert last.shape == (1, 1, 99)
    assert_close(last[:, 0], full[:, -1])


def test_gpt2_exact_gelu_variant_matches(tmp_path):
    path = save_tiny_gpt2(tmp_path / "m", activation_function="gelu")
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    ours = load_model(path)
    ids = torch.randint(0, 99, (1, 8))
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits)


def test_gpt2_lm_head_is_tied():
    model = GPT2(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    assert model.lm_head.weight is model.wte.weight


def test_gpt2_save_loads_in_transformers_with_equal_outputs(tiny_gpt2_dir, tmp_path):
    ours = load_model(tiny_gpt2_dir)
    ours.save_pretrained(tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, 99, (2, 10))
    with torch.no_grad():
        assert_close(back(ids).logits, ours(ids).logits)
    again = load_model(tmp_path / "saved")
    with torch.no_grad():
        assert_close(again(ids).logits, ours(ids).logits)


def test_gpt2_prompt_longer_than_positions_is_refused(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    with pytest.raises(ValueError, match="only 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# RoBERTa

HEADS = [
    ("RobertaModel", "base"),
    ("RobertaForMaskedLM", "masked-lm"),
    ("RobertaForSequenceClassification", "sequence-classification"),
    ("RobertaForTokenClassification", "token-classification"),
    ("RobertaForQuestionAnswering", "question-answering"),
]


def roberta_batch(padding_side: str):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 99, (3, 11), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    lengths = [11, 7, 4]
    for row, n in enumerate(lengths):
        if padding_side == "right":
            mask[row, n:] = 0
        else:
            mask[row, : 11 - n] = 0
    ids[mask == 0] = 1  # <pad>
    return ids, mask


def head_output(out, cls_name: str) -> torch.Tensor:
    if cls_name == "RobertaModel":
        return out.last_hidden_state
    if cls_name == "RobertaForQuestionAnswering":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("cls_name,task", HEADS)
def test_roberta_heads_match(tmp_path, cls_name, task, padding_side):
    labels = 2 if cls_name == "RobertaForQuestionAnswering" else 3
    path = save_tiny_roberta(tmp_path / "m", cls_name, num_labels=labels)
    ref = getattr(transformers, cls_name).from_pretrained(path).eval()
    ours = load_model(path)
    assert ours.task == task
    ids, mask = roberta_batch(padding_side)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    x, y = head_output(b, cls_name), head_output(a, cls_name)
    if x.dim() == 2 and cls_name == "RobertaForSequenceClassification":
        assert_close(x, y)
    else:
        assert_close(x[real], y[real])
    assert len(b.hidden_states) == len(a.hidden_states)
    for h_ours, h_ref in zip(b.hidden_states, a.hidden_states):
        assert_close(h_ours[real], h_ref[real])


@pytest.mark.parametrize("cls_name,task", HEADS)
def test_roberta_save_loads_in_transformers(tmp_path, cls_name, task):
    labels = 2 if cls_name == "RobertaForQuestionAnswering" else 3
    path = save_tiny_roberta(tmp_path / "m", cls_name, num_labels=labels)
    ours = load_model(path)
    ours.save_pretrained(tmp_path / "saved")
    auto = transformers.AutoModelForMaskedLM if task == "masked-lm" else getattr(transformers, cls_name)
    back = auto.from_pretrained(tmp_path / "saved").eval()
    ids, mask = roberta_batch("right")
    with torch.no_grad():
        x = head_output(back(ids, attention_mask=mask), cls_name)
        y = head_output(ours(ids, attention_mask=mask), cls_name)
    real = mask.bool()
    if cls_name == "RobertaForSequenceClassification":
        assert_close(x, y)
    else:
        assert_close(x[real], y[real])


def test_roberta_positions_start_after_padding_idx(tiny_roberta_dir):
    from distillery.models.roberta import roberta_position_ids

    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    assert roberta_position_ids(ids, padding_idx=1).tolist() == [[2, 3, 4, 5, 1, 1]]


def test_roberta_token_types_are_used(tmp_path):
    path = save_tiny_roberta(tmp_path / "m", "RobertaForMaskedLM", type_vocab_size=2)
    ref = transformers.RobertaForMaskedLM.from_pretrained(path).eval()
    ours = load_model(path)
    ids, _ = roberta_batch("right")
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        assert_close(ours(ids, token_type_ids=types).logits, ref(ids, token_type_ids=types).logits)


def test_masked_lm_head_only_at_selected_positions(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    ids, mask = roberta_batch("right")
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[0, 3] = where[2, 1] = True
    with torch.no_grad():
        some = model(ids, attention_mask=mask, logits_positions=where).logits
        full = model(ids, attention_mask=mask).logits
    assert some.shape == (2, 99)
    assert_close(some, full[where])


def test_masked_lm_decoder_tied_and_bias_kept(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir)
    assert model.lm_decoder.weight is model.roberta.embeddings.tok.weight
    ref = transformers.RobertaForMaskedLM.from_pretrained(tiny_roberta_dir)
    assert_close(model.lm_decoder.bias, ref.lm_head.bias)


def test_masked_lm_checkpoint_loads_as_classifier_with_new_head(tiny_roberta_dir):
    model = load_model(tiny_roberta_dir, task="sequence-classification")
    assert model.task == "sequence-classification"
    assert "cls_out.weight" in model.newly_initialized
    ref = transformers.RobertaModel.from_pretrained(tiny_roberta_dir).eval()
    ids, mask = roberta_batch("right")
    with torch.no_grad():
        enc = model.roberta(ids, attention_mask=mask).last_hidden_state
        assert_close(enc[mask.bool()], ref(ids, attention_mask=mask).last_hidden_state[mask.bool()])


# ---------------------------------------------------------------------------------------------
# Configs and presets


def test_presets_have_the_published_sizes():
    from distillery.models import build_model

    sizes = {}
    for name in ("gpt2", "distilgpt2"):
        with torch.device("meta"):
            sizes[name] = build_model(GPT2Config.from_preset(name)).num_parameters()
    for name in ("roberta-base", "distilroberta-base"):
        with torch.device("meta"):
            sizes[name] = build_model(RobertaConfig.from_preset(name), "masked-lm").num_parameters()
    # 124M / 82M (GPT-2, DistilGPT2) and 125M / 82M (RoBERTa-base, DistilRoBERTa) as the cards say.
    assert round(sizes["gpt2"] / 1e6) == 124
    assert round(sizes["distilgpt2"] / 1e6) == 82
    assert round(sizes["roberta-base"] / 1e6) == 125
    assert round(sizes["distilroberta-base"] / 1e6) == 82


def test_config_round_trips_through_hf_dicts():
    cfg = GPT2Config.from_preset("distilgpt2", extra={"task_specific_params": {"text-generation": {}}})
    again = GPT2Config.from_hf(cfg.to_hf())
    assert again == cfg
    hf = transformers.GPT2Config(**GPT2Config.from_preset("gpt2-medium").to_hf())
    assert hf.n_layer == 24 and hf.n_embd == 1024
    rc = RobertaConfig.from_preset("roberta-large", id2label={0: "neg", 1: "pos"})
    assert RobertaConfig.from_hf(rc.to_hf()) == rc


@pytest.mark.parametrize(
    "kwargs,field",
    [(dict(n_embd=30, n_head=4), "n_embd"), (dict(n_layer=0), "n_layer"),
     (dict(activation_function="swishy"), "activation")],
)
def test_bad_gpt2_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GPT2Config(**kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="distilgpt2"):
        GPT2Config.from_preset("gpt5")
