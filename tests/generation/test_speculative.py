"""Speculative decoding: greedy output equals the target's, sampling follows the target's distribution."""

from __future__ import annotations

import pytest
import torch

from distillery.generation.config import GenerationConfig
from distillery.generation.engine import generate
from distillery.generation.speculative import speculative_generate, verify_draft, verify_draft_greedy
from distillery.models import GPT2, DistilleryError, GPT2Config


def tiny_gpt2(seed: int, vocab_size: int = 53, n_layer: int = 2, n_embd: int = 32) -> GPT2:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=96, n_embd=n_embd, n_layer=n_layer, n_head=4)
    model = GPT2(config).eval()
    # Larger weights than GPT-2's init, so that argmaxes are clear-cut and the draft disagrees often.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


@pytest.mark.parametrize("k", [2, 5])
def test_greedy_equals_target_greedy(k):
    target, draft = tiny_gpt2(0, n_layer=3), tiny_gpt2(1, n_layer=1)
    prompt = torch.randint(0, 53, (1, 7), generator=torch.Generator().manual_seed(k))
    expected = generate(target, prompt, config=GenerationConfig(max_new_tokens=30))
    tokens, stats = speculative_generate(target, draft, prompt, max_new_tokens=30, k=k)
    assert tokens.tolist() == expected.tolist()
    assert stats["drafted"] > 0 and 0 <= stats["accepted"] <= stats["drafted"]
    assert stats["target_passes"] < 30 or stats["accepted"] == 0


def test_self_draft_accepts_everything():
    target = tiny_gpt2(0)
    prompt = torch.tensor([[5, 6, 7]])
    tokens, stats = speculative_generate(target, target, prompt, max_new_tokens=21, k=4)
    assert stats["acceptance_rate"] == 1.0
    assert stats["target_passes"] == 1 + 4  # prefill, then 4 rounds of 4 drafted + 1 bonus token
    assert tokens.tolist() == generate(target, prompt, config=GenerationConfig(max_new_tokens=21)).tolist()


def test_greedy_equals_transformers_greedy(tiny_gpt2_dir):
    import transformers

    from distillery.models import load_model

    target = load_model(tiny_gpt2_dir)
    draft = tiny_gpt2(3, vocab_size=99, n_layer=1)
    prompt = torch.tensor([[1, 2, 3, 4]])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                           min_new_tokens=16, pad_token_id=0)
    tokens, _ = speculative_generate(target, draft, prompt, max_new_tokens=16, k=3)
    assert tokens.tolist() == expected.tolist()


def test_stops_after_eos():
    target = tiny_gpt2(0)
    prompt = torch.tensor([[5, 6, 7]])
    full, _ = speculative_generate(target, tiny_gpt2(1), prompt, max_new_tokens=20, k=3)
    eos = full[0, 3 + 5].item()  # the 6th new token
    stopped, _ = speculative_generate(target, tiny_gpt2(1), prompt, max_new_tokens=20, k=3, eos_token_id=eos)
    first = full[0, 3:].tolist().index(eos)
    assert stopped.tolist() == full[:, : 3 + first + 1].tolist()


def test_acceptance_rule_reproduces_target_distribution():
    # Draft a token from q, apply the rule: the emitted token must be distributed as p.
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    bonus = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # after an accepted draft; not the first token
    counts = torch.zeros(5)
    n = 5000
    for _ in range(n):
        drafted = torch.multinomial(q, 1, generator=gen)
        kept, following = verify_draft(torch.stack([p, bonus]), q[None], drafted, gen)
        counts[int(drafted) if kept else following] += 1
    freq = counts / n
    # 4 standard deviations of a binomial frequency at n = 5000 is at most 0.0283.
    assert torch.allclose(freq, p, atol=0.03), freq


def test_acceptance_rule_keeps_all_when_draft_equals_target():
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4], [0.0, 1.0]])
    kept, following = verify_draft(p, p[:2], torch.tensor([1, 0]), torch.Generator().manual_seed(1))
    assert (kept, following) == (2, 1)


def test_greedy_rule():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert verify_draft_greedy(logits, torch.tensor([1, 0])) == (2, 2)
    assert verify_draft_greedy(logits, torch.tensor([1, 2])) == (1, 0)
    assert verify_draft_greedy(logits, torch.tensor([0, 0])) == (0, 1)


def test_sampling_is_reproducible_and_in_vocabulary():
    target, draft = tiny_gpt2(0, vocab_size=11), tiny_gpt2(1, vocab_size=11)
    prompt = torch.tensor([[1, 2]])
    runs = [speculative_generate(target, draft, prompt, 25, k=3, do_sample=True, temperature=0.8, top_k=6,
                                 generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[0].shape == (1, 27) and int(runs[0].max()) < 11


def test_different_vocabularies_are_refused():
    with pytest.raises(DistilleryError, match="vocabulary"):
        speculative_generate(tiny_gpt2(0, vocab_size=53), tiny_gpt2(1, vocab_size=60), torch.tensor([[1]]), 5)


def test_bad_settings_are_refused():
    target = tiny_gpt2(0)
    with pytest.raises(DistilleryError, match="k \\(tokens drafted"):
        speculative_generate(target, target, torch.tensor([[1]]), 5, k=0)
    with pytest.raises(DistilleryError, match="one prompt"):
        speculative_generate(target, target, torch.tensor([[1], [2]]), 5)
    with pytest.raises(DistilleryError, match="positions"):
        speculative_generate(target, target, torch.tensor([[1]]), 500)
