"""Distillation losses: small pure functions, each with its formula.

Conventions shared by every function:
- logits are (B, T, V) or already flattened (N, V); hidden states (B, T, C) or (N, C).
- `mask` is an optional (B, T) bool tensor of the positions that count (non-pad tokens, or only the
  masked positions of an MLM batch). The result is the mean over counted positions, and 0 when no
  position counts (a batch of nothing contributes nothing rather than NaN).
- Inputs may be bf16/fp16; everything is computed in float32. Positions outside `mask` are
  dropped before the softmax, so an MLM batch pays only for its ~15 % masked positions.
- p_s = softmax(student / T), p_t = softmax(teacher / T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distillery.models.common import DistilleryError

IGNORE_INDEX = -100


def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The counted rows of x as (N, last_dim), in float32."""
    if mask is not None:
        assert mask.shape == x.shape[:-1], f"mask {tuple(mask.shape)} does not fit {tuple(x.shape)}"
        x = x[mask.bool()]
    return x.reshape(-1, x.size(-1)).float()


def _mean(per_row: torch.Tensor) -> torch.Tensor:
    # sum / max(N, 1): the mean over counted rows, 0 (with a gradient path) when there are none.
    return per_row.sum() / max(per_row.numel(), 1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row: sum_v p_v (log p_v - log q_v), with 0 log 0 = 0."""
    p = log_p.exp()
    terms = p * (log_p - log_q)
    # Where p_v = 0 (a logit of -inf), the term is 0 even if log q_v is -inf too.
    return terms.masked_fill(p == 0, 0.0).sum(-1)


def _log_probs(logits: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    return torch.log_softmax(_select(logits, mask) / temperature, dim=-1)


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL on softened distributions, DistilBERT's `loss_ce`.

        loss = T^2 * mean_positions KL(p_t || p_s) = T^2 * mean sum_v p_t,v (log p_t,v - log p_s,v)

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015). Forward KL is
    mode-covering: the student is pushed to put mass wherever the teacher does.
    """
    log_p_s = _log_probs(student_logits, mask, temperature)
    log_p_t = _log_probs(teacher_logits, mask, temperature)
    return temperature**2 * _mean(_kl_rows(log_p_t, log_p_s))


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL, mode-seeking (MiniLLM, GKD):

        loss = T^2 * mean_positions KL(p_s || p_t) = T^2 * mean sum_v p_s,v (log p_s,v - log p_t,v)
    """
    log_p_s = _log_probs(student_logits, mask, temperature)
    log_p_t = _log_probs(teacher_logits, mask, temperature)
    return temperature**2 * _mean(_kl_rows(log_p_s, log_p_t))


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024):

        m = beta * p_t + (1 - beta) * p_s
        JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)
        loss = T^2 * mean_positions JSD_beta

    For 0 < beta < 1 it is bounded (by T^2 * H(beta)) and JSD_0.5 is the ordinary JSD. Near the
    ends it vanishes like beta * KL(p_t || p_s) (beta -> 0) and (1 - beta) * KL(p_s || p_t)
    (beta -> 1), so the ends themselves are defined as the unscaled limits, as in TRL's GKD:
    beta = 0 is exactly the forward KL `soft_target_kl` and beta = 1 exactly the `reverse_kl`.
    Swapping the roles mirrors beta: jsd(s, t, beta) == jsd(t, s, 1 - beta).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}.")
    if beta == 0.0:
        return soft_target_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    log_p_s = _log_probs(student_logits, mask, temperature)
    log_p_t = _log_probs(teacher_logits, mask, temperature)
    # log m computed stably: logsumexp(log p_t + log beta, log p_s + log(1 - beta)).
    log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
    jsd = beta * _kl_rows(log_p_t, log_m) + (1.0 - beta) * _kl_rows(log_p_s, log_m)
    return temperature**2 * _mean(jsd)


def causal_lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy; `targets` are already shifted by the caller.

        loss = mean_positions -log softmax(logits[b, t])[targets[b, t]]

    targets[b, t] is the token that follows position t, so for a window `w` of T + 1 tokens the
    caller passes logits of w[:, :-1] and targets w[:, 1:]. Targets equal to -100 never count.
    """
    keep = targets != IGNORE_INDEX
    if mask is not None:
        keep = keep & mask.bool()
    return _mean(F.cross_entropy(_select(logits, keep), targets[keep], reduction="none"))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the masked positions only:

        loss = mean_{labels != -100} -log softmax(logits)[label]

    logits (B, T, V) with labels (B, T); or logits (N, V) computed only at the masked positions
    (RobertaForMaskedLM's `logits_positions=labels != -100`) with labels (B, T) or (N,).
    """
    if logits.dim() == 2 and labels.numel() != logits.size(0):
        labels = labels[labels != IGNORE_INDEX]  # logits were computed only where labels count
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    rows = logits.reshape(-1, logits.size(-1))[keep].float()
    return _mean(F.cross_entropy(rows, labels[keep], reduction="none"))


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DistilBERT's `loss_cos`: align the directions of the hidden states.

        loss = mean_positions (1 - cos(h_s, h_t))

    0 for identical states, 2 for opposite ones. Needs equal widths (a half-depth student has them).
    """
    if student_hidden.size(-1) != teacher_hidden.size(-1):
        raise DistilleryError(
            f"the cosine loss compares hidden states of equal width, but the student has "
            f"{student_hidden.size(-1)} and the teacher {teacher_hidden.size(-1)}; set alpha_cos to 0."
        )
    h_s = _select(student_hidden, mask)
    h_t = _select(teacher_hidden, mask)
    return _mean(1.0 - F.cosine_similarity(h_s, h_t, dim=-1))


def logits_mse(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between raw logits, averaged over the vocabulary and counted positions:

        loss = mean_positions mean_v (s_v - t_v)^2

    (DistilBERT's `alpha_mse` summed over the vocabulary instead; the mean keeps the scale
    independent of the vocabulary size.)
    """
    diff = _select(student_logits, mask) - _select(teacher_logits, mask)
    return _mean(diff.pow(2).mean(-1))
