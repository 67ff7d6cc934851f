"""Distillation losses checked against identities, hand-computed values and torch's own kl_div."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.distill.losses import (
    causal_lm_loss,
    generalized_jsd,
    hidden_cosine_loss,
    logits_mse,
    masked_lm_loss,
    reverse_kl,
    soft_target_kl,
)
from distillery.models.common import DistilleryError


def logits(seed: int, shape=(2, 5, 11), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def test_kl_of_a_distribution_with_itself_is_zero():
    s = logits(0)
    for loss in (soft_target_kl, reverse_kl):
        assert loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert generalized_jsd(s, s.clone(), beta=0.3).item() == pytest.approx(0.0, abs=1e-6)
    # Adding a constant per position does not change a softmax.
    assert soft_target_kl(s, s + 5.0).item() == pytest.approx(0.0, abs=1e-5)


def test_divergences_are_positive_for_different_distributions():
    s, t = logits(0), logits(1)
    assert soft_target_kl(s, t) > 0
    assert reverse_kl(s, t) > 0
    for beta in (0.1, 0.5, 0.9):
        assert generalized_jsd(s, t, beta=beta) > 0


def test_forward_kl_matches_torch_kl_div():
    s, t = logits(0), logits(1)
    T = 2.0
    expected = F.kl_div(
        F.log_softmax(s / T, -1).reshape(-1, 11), F.log_softmax(t / T, -1).reshape(-1, 11),
        reduction="batchmean", log_target=True,
    ) * T**2
    torch.testing.assert_close(soft_target_kl(s, t, temperature=T), expected)


def test_hand_computed_kl():
    # p_t = (1/2, 1/2), p_s = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert soft_target_kl(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # Reverse: 1/4 ln(1/2) + 3/4 ln(3/2).
    assert reverse_kl(s, t).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = logits(0), logits(1)
    torch.testing.assert_close(reverse_kl(s, t, temperature=1.0), soft_target_kl(t, s, temperature=1.0))
    torch.testing.assert_close(reverse_kl(s, t, temperature=3.0), soft_target_kl(t, s, temperature=3.0))


def test_temperature_squared_scaling():
    s, t = logits(0), logits(1)
    T = 4.0
    unscaled = soft_target_kl(s / T, t / T, temperature=1.0)
    torch.testing.assert_close(soft_target_kl(s, t, temperature=T), T**2 * unscaled)
    torch.testing.assert_close(reverse_kl(s, t, temperature=T), T**2 * reverse_kl(s / T, t / T))


def test_jsd_ends_are_exactly_forward_and_reverse_kl():
    s, t = logits(0), logits(1)
    assert generalized_jsd(s, t, beta=0.0, temperature=2.0) == soft_target_kl(s, t, temperature=2.0)
    assert generalized_jsd(s, t, beta=1.0, temperature=2.0) == reverse_kl(s, t, temperature=2.0)


def test_jsd_approaches_scaled_kl_near_the_ends():
    s, t = logits(0, scale=1.0).double(), logits(1, scale=1.0).double()
    eps = 1e-4
    fwd, rev = soft_target_kl(s, t, temperature=1.0), reverse_kl(s, t)
    assert (generalized_jsd(s, t, beta=eps) / eps).item() == pytest.approx(fwd.item(), rel=1e-2)
    assert (generalized_jsd(s, t, beta=1 - eps) / eps).item() == pytest.approx(rev.item(), rel=1e-2)


def test_jsd_mirror_symmetry_and_bound():
    s, t = logits(0), logits(1)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.3), generalized_jsd(t, s, beta=0.7))
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5))
    # The ordinary JSD is at most ln 2; disjoint distributions reach it.
    far_s = torch.tensor([[50.0, -50.0]])
    far_t = torch.tensor([[-50.0, 50.0]])
    assert generalized_jsd(far_s, far_t, beta=0.5).item() == pytest.approx(math.log(2), rel=1e-5)
    assert generalized_jsd(s, t, beta=0.5).item() <= math.log(2)


def test_masked_positions_are_ignored():
    s, t = logits(0), logits(1)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 4] = True
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[~mask] = 1e4
    garbage_t[~mask] = -1e4
    for loss in (soft_target_kl, reverse_kl, generalized_jsd, logits_mse):
        torch.testing.assert_close(loss(garbage_s, garbage_t, mask=mask), loss(s[mask], t[mask]))
    # The mean is over counted positions, not over the batch.
    per_row = torch.stack([soft_target_kl(s[mask][i:i + 1], t[mask][i:i + 1]) for i in range(4)])
    torch.testing.assert_close(soft_target_kl(s, t, mask=mask), per_row.mean())


def test_nothing_counted_gives_zero_not_nan():
    s, t = logits(0), logits(1)
    none = torch.zeros(2, 5, dtype=torch.bool)
    for loss in (soft_target_kl, reverse_kl, generalized_jsd, logits_mse, hidden_cosine_loss):
        assert loss(s, t, mask=none).item() == 0.0
    assert causal_lm_loss(s, torch.zeros(2, 5, dtype=torch.long), mask=none).item() == 0.0
    assert masked_lm_loss(s, torch.full((2, 5), -100)).item() == 0.0


def test_gradients_are_finite_even_for_extreme_and_infinite_logits():
    s = logits(0, scale=100.0).requires_grad_()
    t = logits(1, scale=100.0)
    t[..., 0] = float("-inf")  # a token the teacher rules out entirely
    total = soft_target_kl(s, t) + reverse_kl(s, t.clamp(min=-1e4)) + generalized_jsd(s, t, beta=0.5)
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(s.grad).all()


def test_bf16_inputs_are_computed_in_float32():
    s, t = logits(0), logits(1)
    low = soft_target_kl(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(soft_target_kl(s.bfloat16().float(), t.bfloat16().float()).item())


def test_causal_lm_loss_matches_cross_entropy():
    x = logits(0)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = F.cross_entropy(x.reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(causal_lm_loss(x, targets), expected)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(causal_lm_loss(x, targets, mask), F.cross_entropy(x[mask], targets[mask]))
    # A uniform prediction costs ln V.
    assert causal_lm_loss(torch.zeros(1, 3, 11), targets[:1, :3]).item() == pytest.approx(math.log(11))


def test_masked_lm_loss_full_and_selected_logits_agree():
    x = logits(0)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 4, 7, 2
    expected = F.cross_entropy(x.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(masked_lm_loss(x, labels), expected)
    selected = x[labels != -100]  # what RobertaForMaskedLM(logits_positions=...) returns
    torch.testing.assert_close(masked_lm_loss(selected, labels), expected)
    torch.testing.assert_close(masked_lm_loss(selected, labels[labels != -100]), expected)


def test_cosine_loss_identical_opposite_and_orthogonal():
    h = logits(0, shape=(2, 5, 8))
    assert hidden_cosine_loss(h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_cosine_loss(h, -h).item() == pytest.approx(2.0, abs=1e-6)
    assert hidden_cosine_loss(h, 3.0 * h).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    assert hidden_cosine_loss(a, b).item() == pytest.approx(1.0)


def test_cosine_loss_rejects_different_widths():
    with pytest.raises(DistilleryError, match="alpha_cos"):
        hidden_cosine_loss(torch.zeros(1, 2, 8), torch.zeros(1, 2, 16))


def test_logits_mse_hand_computed():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    # Positions: (1 + 4) / 2 = 2.5 and (0 + 4) / 2 = 2; mean 2.25.
    assert logits_mse(s, t).item() == pytest.approx(2.25)
