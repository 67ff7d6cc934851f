"""Causal-LM fine-tuning: blocks, learning a repetitive text, and refusing the wrong model."""

from __future__ import annotations

import pytest
import torch

from distillery.evaluate.finetune import CausalFinetuneSettings, finetune_causal_lm, text_blocks
from distillery.models import load_model
from distillery.models.common import DistilleryError


class IdTokenizer:
    def encode(self, text, add_special_tokens=True):
        return [int(t) for t in text.split()]


def test_blocks_drop_the_remainder():
    blocks = text_blocks(list(range(10)), 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DistilleryError, match="less than one block of 4"):
        text_blocks([1, 2, 3], 4)


def test_learns_a_repetitive_text(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    text = " ".join(["5 6 7 8 9 10 11 12"] * 32)  # 256 tokens, 16 blocks of 16
    x = torch.tensor([[int(t) for t in text.split()[:16]]])
    before = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:]).item()
    settings = CausalFinetuneSettings(epochs=6, block_size=16, batch_size=8, learning_rate=2e-2)
    result = finetune_causal_lm(model, IdTokenizer(), text, settings, progress=False)
    assert result["steps"] == 12 and result["blocks"] == 16
    with torch.no_grad():
        after = torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:]).item()
    assert after < before / 2


def test_max_steps_and_block_clamped(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)  # 64 positions
    settings = CausalFinetuneSettings(block_size=512, batch_size=1, max_steps=2)
    result = finetune_causal_lm(model, IdTokenizer(), " ".join(["5"] * 200), settings, progress=False)
    assert result["steps"] == 2 and result["settings"]["block_size"] == 64 and result["blocks"] == 3


def test_masked_lm_is_refused(tiny_roberta_dir):
    with pytest.raises(DistilleryError, match="finetune trains causal LMs"):
        finetune_causal_lm(load_model(tiny_roberta_dir), IdTokenizer(), "5 6", CausalFinetuneSettings())
