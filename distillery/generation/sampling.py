"""Logits processors and the sampler: small pure functions on (B, V) float32 scores.

They reproduce transformers' processors (RepetitionPenalty, Temperature, TopK, TopP, then softmax and
torch.multinomial) operation for operation, so that with the same logits and the same torch seed the
same tokens are drawn.
"""

from __future__ import annotations

import torch

from distillery.generation.config import GenerationConfig


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019) on the tokens already in each row.

    For a seen token with score s: s / penalty if s > 0, else s * penalty, so that penalty > 1 always
    makes it less likely. `seen` is a (B, V) bool mask of the tokens in the row so far.
    """
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_i ∝ exp(s_i / T): T < 1 sharpens the distribution, T > 1 flattens it."""
    return scores / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores of each row (ties with the k-th kept too), -inf elsewhere."""
    k = min(k, scores.size(-1))
    kth_best = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth_best, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al., 2019): keep the smallest set of most likely tokens whose
    probability reaches p; always keep the most likely one.

    Works on the ascending sort: a token goes when the cumulative probability up to and including
    it is <= 1 - p, i.e. the tokens above it already hold at least p.
    """
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """(B, V) float32 next-token logits -> the scores to sample from (or take the argmax of)."""
    scores = logits
    if config.repetition_penalty != 1.0:
        assert seen is not None, "the repetition penalty needs the mask of seen tokens"
        scores = apply_repetition_penalty(scores, seen, config.repetition_penalty)
    if config.greedy:
        return scores
    if config.temperature != 1.0:
        scores = apply_temperature(scores, config.temperature)
    if config.top_k != 0:
        scores = top_k_filter(scores, config.top_k)
    if config.top_p < 1.0:
        scores = top_p_filter(scores, config.top_p)
    return scores


def sample_next(scores: torch.Tensor, greedy: bool) -> torch.Tensor:
    """(B, V) processed scores -> (B,) next tokens: argmax, or one draw from softmax(scores)."""
    if greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)
