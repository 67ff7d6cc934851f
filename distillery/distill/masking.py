"""Masked-LM inputs, the DistilBERT way.

BERT picks each token with probability 0.15. DistilBERT's `mlm_smoothing` instead picks exactly
15 % of a batch's real tokens, drawing positions without replacement with probability proportional
to count(token)^-0.7 (XLM's smoothing), so frequent tokens ("the", ",") are masked less and rare
ones more. The chosen positions then become <mask> (80 %), a random token (10 %) or stay (10 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

IGNORE_INDEX = -100
REPLACE_PROBS = (0.8, 0.1, 0.1)  # <mask>, random token, unchanged


def token_probabilities(
    token_counts: np.ndarray, smoothing: float = 0.7, special_ids: Iterable[int] = ()
) -> torch.Tensor:
    """Unnormalised masking weight per token id: max(count, 1)^-smoothing, 0 for special tokens.

    `token_counts` is the per-id count over the training data (`token_counts.npy` written by
    `distillery prepare`). A token never seen gets the weight of a token seen once; it cannot be
    chosen anyway, since only tokens present in a batch are. smoothing = 0 weights all tokens
    equally (BERT's uniform choice).
    """
    counts = np.maximum(np.asarray(token_counts, dtype=np.float64), 1.0)
    weights = torch.from_numpy(counts ** -float(smoothing)).float()
    specials = [i for i in special_ids if 0 <= i < len(weights)]
    weights[specials] = 0.0
    return weights


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    probs: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    mlm_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for one masked-LM batch.

    Of the real (attention_mask = 1), non-special tokens of the whole batch, ceil(mlm_prob * n)
    positions are drawn without replacement with probability proportional to probs[token]
    (`token_probabilities`). labels hold the original token there and -100 elsewhere; inputs get
    <mask> at 80 % of the chosen positions, a uniformly random non-special token at 10 %, and
    keep the token at the other 10 %. `generator` must live on input_ids' device (masking on the
    CPU before moving the batch is cheap and keeps one generator for the run).
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long, device=input_ids.device)
    eligible = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    weights = probs.to(input_ids.device)[input_ids].float() * eligible  # (B, T)
    eligible_count = int((weights > 0).sum())
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    inputs = input_ids.clone()
    if eligible_count == 0:
        return inputs, labels
    n_chosen = min(eligible_count, math.ceil(mlm_prob * eligible_count))
    chosen = torch.multinomial(weights.flatten(), n_chosen, replacement=False, generator=generator)

    flat_inputs, flat_labels = inputs.view(-1), labels.view(-1)
    flat_labels[chosen] = input_ids.view(-1)[chosen]
    action = torch.rand(n_chosen, generator=generator, device=input_ids.device)
    to_mask = chosen[action < REPLACE_PROBS[0]]
    to_random = chosen[(action >= REPLACE_PROBS[0]) & (action < REPLACE_PROBS[0] + REPLACE_PROBS[1])]
    flat_inputs[to_mask] = mask_token_id
    # Random replacements come from the ordinary vocabulary: a random <pad> or </s> would teach
    # the model nothing and can confuse position handling.
    keep = torch.ones(vocab_size, dtype=torch.bool, device=input_ids.device)
    keep[special[special < vocab_size]] = False
    ordinary = keep.nonzero().squeeze(1)
    pick = torch.randint(len(ordinary), (len(to_random),), generator=generator, device=input_ids.device)
    flat_inputs[to_random] = ordinary[pick]
    return inputs, labels
