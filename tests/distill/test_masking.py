"""MLM masking: how many positions, which ones, and what they become."""

import numpy as np
import pytest
import torch

from distillery.distill.masking import mask_tokens, token_probabilities

V = 50
PAD, BOS, EOS, MASK = 1, 0, 2, 49
SPECIALS = (BOS, PAD, EOS, MASK)


def batch(seed: int = 0, B: int = 64, T: int = 128):
    """Random ordinary tokens framed by <s> ... </s>, the second half of rows padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (B, T), generator=g)
    ids[:, 0] = BOS
    attention = torch.ones(B, T, dtype=torch.long)
    lengths = torch.where(torch.arange(B) % 2 == 0, T, T // 2)
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = EOS
        ids[b, n:] = PAD
        attention[b, n:] = 0
    return ids, attention


def test_token_probabilities_smoothing_specials_and_unseen():
    counts = np.array([0, 1, 8, 1000, 5])
    probs = token_probabilities(counts, smoothing=0.7, special_ids=[4])
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs[:4], torch.tensor([1.0, 1.0, 8**-0.7, 1000**-0.7]))
    assert probs[4] == 0
    torch.testing.assert_close(token_probabilities(counts, smoothing=0.0), torch.ones(5))


def test_proportions_of_chosen_and_replaced_positions():
    ids, attention = batch()
    probs = token_probabilities(np.ones(V), special_ids=SPECIALS)
    inputs, labels = mask_tokens(ids, attention, probs, MASK, V, SPECIALS, generator=torch.Generator().manual_seed(0))
    eligible = attention.bool() & ~torch.isin(ids, torch.tensor(SPECIALS))
    chosen = labels != -100
    assert chosen.sum().item() == int(np.ceil(0.15 * eligible.sum().item()))
    assert torch.equal(labels[chosen], ids[chosen])
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / 45, abs=0.03)  # a random token may equal the original
    # Unchosen positions are untouched, random replacements are ordinary tokens.
    assert torch.equal(inputs[~chosen], ids[~chosen])
    replaced = chosen & (inputs != MASK) & (inputs != ids)
    assert replaced.any()
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any()


def test_specials_and_padding_are_never_chosen():
    ids, attention = batch(1)
    # Padding that is not the pad id (a GPT-2 style batch) must be skipped through the attention mask.
    ids[attention == 0] = 7
    probs = token_probabilities(np.ones(V), special_ids=SPECIALS)
    for seed in range(5):
        _, labels = mask_tokens(ids, attention, probs, MASK, V, SPECIALS, mlm_prob=0.9,
                                generator=torch.Generator().manual_seed(seed))
        chosen = labels != -100
        assert not chosen[attention == 0].any()
        assert not torch.isin(ids[chosen], torch.tensor(SPECIALS)).any()


def test_rare_tokens_are_chosen_more_often():
    ids, attention = batch(2)
    counts = np.ones(V)
    counts[10] = 1e6  # a very frequent token: almost never masked
    probs = token_probabilities(counts, special_ids=SPECIALS)
    _, labels = mask_tokens(ids, attention, probs, MASK, V, SPECIALS, generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    frequent = ids == 10
    assert chosen[frequent].float().mean() < 0.2 * chosen[~frequent & attention.bool()].float().mean()


def test_seeded_generator_is_deterministic():
    ids, attention = batch(3)
    probs = token_probabilities(np.arange(V) + 1.0, special_ids=SPECIALS)

    def run(seed):
        return mask_tokens(ids, attention, probs, MASK, V, SPECIALS, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_batch_of_only_specials_masks_nothing():
    ids = torch.tensor([[BOS, EOS, PAD]])
    probs = token_probabilities(np.ones(V), special_ids=SPECIALS)
    inputs, labels = mask_tokens(ids, None, probs, MASK, V, SPECIALS)
    assert torch.equal(inputs, ids)
    assert (labels == -100).all()
