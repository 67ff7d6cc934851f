"""Perplexity against the transformers loop of the HF guide, on the same tiny weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_tiny_gpt2, save_tiny_roberta

from distillery.evaluate.perplexity import perplexity, read_text, sliding_windows
from distillery.models import load_model
from distillery.models.common import DistilleryError


def guide_perplexity(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of "Perplexity of fixed-length models" (transformers docs), with its token count."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


class IdTokenizer:
    """Text is a space-separated list of ids (the tiny models have 99 made-up tokens)."""

    mask_token_id, bos_token_id, eos_token_id = 4, 0, 2

    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]


@pytest.mark.parametrize("max_length,stride", [(16, 16), (16, 3), (20, 7), (64, 32)])
def test_matches_guide_loop(tiny_gpt2_dir, max_length, stride):
    import transformers

    ids = torch.randint(0, 99, (1, 100), generator=torch.Generator().manual_seed(1))
    text = " ".join(map(str, ids[0].tolist()))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    want_ppl, want_tokens = guide_perplexity(hf, ids, max_length, stride)
    got = perplexity(load_model(tiny_gpt2_dir), IdTokenizer(), text, max_length, stride, batch_size=3)
    assert got["tokens"] == want_tokens
    assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-4)
    # Every token but the first once; non-overlapping windows also lose each window's first token.
    assert got["scored_tokens"] == (99 if stride < max_length else 100 - len(range(0, 100, stride)))


def test_windows_score_every_token_once():
    for n, length, stride in [(100, 10, 3), (100, 10, 10), (37, 37, 5), (50, 8, 1)]:
        windows = sliding_windows(n, length, stride)
        assert windows[0].begin == 0 and windows[-1].end == n
        assert sum(w.targets for w in windows) == n
        assert all(w.end - w.begin - w.targets >= length - stride for w in windows[1:])


def test_wikitext2_real_vocab(tmp_path, shared_data):
    """The real WikiText-2 raw test file (its start) with the real GPT-2 vocabulary."""
    import transformers

    tok_dir = shared_data / "tokenizers" / "gpt2"
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tok_dir)
    text = read_text(shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw")[:3000]
    model_dir = save_tiny_gpt2(tmp_path / "m", vocab_size=50257, n_positions=128, n_embd=16, n_head=2)
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    want_ppl, want_tokens = guide_perplexity(hf, ids, 128, 64)
    got = perplexity(load_model(model_dir), tokenizer, text, 128, 64)
    assert got["tokens"] == want_tokens
    assert got["perplexity"] == pytest.approx(want_ppl, rel=1e-4)
    # A random model is about as good as uniform over the vocabulary.
    assert 0.5 * 50257 < got["perplexity"] < 2 * 50257
    assert got["words"] == len(text.split()) + 1  # wiki.test.raw starts with " = Robert ..."
    assert got["bits_per_byte"] == pytest.approx(got["nll_sum"] / len(text.encode()) / math.log(2))
    assert got["word_perplexity"] == pytest.approx(math.exp(got["nll_sum"] / got["words"]))


def test_pseudo_perplexity_masks_each_token(tmp_path):
    import transformers

    model_dir = save_tiny_roberta(tmp_path / "r")
    hf = transformers.RobertaForMaskedLM.from_pretrained(model_dir).eval()
    ids = torch.randint(5, 99, (16,), generator=torch.Generator().manual_seed(2))
    text = " ".join(map(str, ids.tolist()))
    # Reference: one window (<s> ids </s>), each token masked alone.
    nll = 0.0
    for i in range(len(ids)):
        x = torch.cat([torch.tensor([0]), ids, torch.tensor([2])])[None]
        x[0, i + 1] = 4
        with torch.no_grad():
            nll -= torch.log_softmax(hf(x).logits[0, i + 1], -1)[ids[i]].item()
    got = perplexity(load_model(model_dir), IdTokenizer(), text, max_length=16, stride=16, batch_size=7)
    assert got["method"] == "pseudo-perplexity" and got["tokens"] == 16
    assert got["perplexity"] == pytest.approx(math.exp(nll / 16), rel=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_length=16, stride=17), "--stride 17"),
    (dict(max_length=200, stride=8), "exceeds the model's 64 positions"),
    (dict(max_length=60, stride=8), "shorter than one window"),
])
def test_bad_windows(tiny_gpt2_dir, kwargs, message):
    text = " ".join(["5"] * 40)
    with pytest.raises(DistilleryError, match=message):
        perplexity(load_model(tiny_gpt2_dir), IdTokenizer(), text, **kwargs)


def test_classifier_is_refused(tmp_path):
    model = load_model(save_tiny_roberta(tmp_path / "c", "RobertaForSequenceClassification"))
    with pytest.raises(DistilleryError, match="language model head"):
        perplexity(model, IdTokenizer(), "5 6 7", 2, 1)
