"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

Each round the draft decodes k tokens one by one from its own KV cache (cheap: it is small), then
the target runs all of them in a single forward pass (about the cost of one decode step, since
decoding is memory-bound), which gives the target's distribution at each drafted position. Drafted
token i is kept with probability min(1, p(x_i) / q(x_i)); at the first rejection a replacement is
drawn from norm(max(0, p - q)); if all k are kept, a bonus token comes from the target's
distribution after them (Leviathan et al., 2023; Chen et al., 2023). Every emitted token then
follows the target's distribution exactly; greedy decoding keeps drafted tokens while they equal
the target's argmax, so it yields the target's greedy output token for token. Rejected positions
are dropped from both KV caches by moving `cache.length` back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distillery.generation.config import GenerationConfig
from distillery.generation.sampling import process_logits
from distillery.models.common import ConfigError, DistilleryError, KVCache


@dataclass
class SpeculativeStats:
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # of those, tokens the target kept
    target_passes: int = 0  # target forward passes, prefill included
    draft_passes: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"acceptance_rate": self.acceptance_rate, "drafted": self.drafted, "accepted": self.accepted,
                "target_passes": self.target_passes, "draft_passes": self.draft_passes}


def verify_draft(
    target_probs: torch.Tensor,  # (k + 1, V): the target's distribution at each drafted position and after
    draft_probs: torch.Tensor,  # (k, V): the draft's distribution each drafted token was drawn from
    drafted: torch.Tensor,  # (k,) the drafted tokens
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The acceptance rule: (how many drafted tokens are kept, the token that follows them).

    Token i is kept with probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection the next
    token is drawn from norm(max(0, p_i - q_i)); when all are kept, from p_{k+1}. The kept tokens
    plus that one are distributed exactly as tokens drawn from the target one at a time.
    """
    k = drafted.numel()
    idx = torch.arange(k)
    p = target_probs[idx, drafted]
    q = draft_probs[idx, drafted]
    u = torch.rand(k, generator=generator, device=target_probs.device)
    rejected = (u * q > p).nonzero()  # u < p/q, written without dividing by q
    if rejected.numel() == 0:
        return k, _draw(target_probs[k], generator)
    n = int(rejected[0])
    residual = (target_probs[n] - draft_probs[n]).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q at that position: rejection had probability 0
        residual = target_probs[n]
    return n, _draw(residual / residual.sum(), generator)


def verify_draft_greedy(target_logits: torch.Tensor, drafted: torch.Tensor) -> tuple[int, int]:
    """Greedy rule: keep drafted tokens while they equal the target's argmax; then the argmax."""
    best = target_logits.argmax(-1)  # (k + 1,)
    mismatch = (best[:-1] != drafted).nonzero()
    n = int(mismatch[0]) if mismatch.numel() else drafted.numel()
    return n, int(best[n])


@torch.inference_mode()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Generate from `target` with `draft` proposing `k` tokens per round; batch 1.

    Returns (1, T + generated) token ids, prompt included, and stats: acceptance_rate, drafted,
    accepted, target_passes, draft_passes. Sampling settings mean what they mean in
    `GenerationConfig` and apply to both models; generation stops after `eos_token_id`.
    """
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p)
    _check_pair(target, draft, input_ids, max_new_tokens, k)
    device = target.device
    prompt = input_ids.to(device)
    T = prompt.size(1)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return prompt, stats.as_dict()

    target_cache = target.new_cache(1, T + max_new_tokens)
    draft_cache = draft.new_cache(1, T + max_new_tokens)
    logits = target(prompt, cache=target_cache, logits_to_keep=1).logits[0, -1].float()
    stats.target_passes += 1
    token = _pick(logits, config, generator)
    out = [token]
    # Tokens the draft's cache does not hold yet (all but the last are already decided).
    pending = prompt[0].tolist() + [token]

    while len(out) < max_new_tokens and token != eos_token_id:
        # Leave room for the token that follows the drafted ones within max_new_tokens.
        k_round = min(k, max_new_tokens - len(out) - 1)
        start = target_cache.length  # the target holds everything before `token`
        if k_round == 0:
            logits = target(torch.tensor([[token]], device=device), cache=target_cache,
                            logits_to_keep=1).logits[0, -1].float()
            stats.target_passes += 1
            token = _pick(logits, config, generator)
            out.append(token)
            pending.append(token)
            continue

        drafted, draft_scores = _draft(draft, draft_cache, pending, k_round, config, generator)
        stats.draft_passes += k_round
        stats.drafted += k_round
        verify_in = torch.tensor([[token] + drafted], device=device)
        target_scores = _scores(target(verify_in, cache=target_cache).logits[0].float(), config)
        stats.target_passes += 1
        drafted_t = torch.tensor(drafted, device=device)
        if config.greedy:
            n, token = verify_draft_greedy(target_scores, drafted_t)
        else:
            n, token = verify_draft(target_scores.softmax(-1), draft_scores.softmax(-1), drafted_t, generator)
        stats.accepted += n
        kept = drafted[:n]
        if eos_token_id in kept:
            out.extend(kept[: kept.index(eos_token_id) + 1])
            break
        out.extend(kept)
        out.append(token)
        target_cache.length = start + 1 + n  # drop the target's rejected positions
        # The draft cache holds `token` and drafted[:k_round - 1] (up to start + k_round); keep the
        # accepted part. When all were kept, the last drafted token has not been through the draft.
        draft_cache.length = min(draft_cache.length, start + 1 + n)
        pending = [drafted[-1], token] if n == k_round else [token]
    out = out[:max_new_tokens]
    return torch.cat([prompt, torch.tensor([out], device=device)], dim=1), stats.as_dict()


def _draft(draft: nn.Module, cache: KVCache, pending: list[int], k: int, config: GenerationConfig,
           generator: torch.Generator | None) -> tuple[list[int], torch.Tensor]:
    """k tokens from the draft, one forward each; returns them and the (k, V) scores they came from."""
    device = cache.device
    tokens, scores = [], []
    feed = pending
    for _ in range(k):
        logits = draft(torch.tensor([feed], device=device), cache=cache, logits_to_keep=1).logits[0, -1]
        s = _scores(logits.float()[None], config)[0]
        token = _pick_from_scores(s, config, generator)
        tokens.append(token)
        scores.append(s)
        feed = [token]
    return tokens, torch.stack(scores)


def _scores(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """(N, V) logits -> processed scores (temperature, top-k, top-p) as the engine applies them."""
    return process_logits(logits, None, config)


def _pick(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    return _pick_from_scores(_scores(logits[None], config)[0], config, generator)


def _pick_from_scores(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    if config.greedy:
        return int(scores.argmax())
    return _draw(scores.softmax(-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_pair(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                k: int) -> None:
    for role, model in (("target", target), ("draft", draft)):
        if not hasattr(model, "new_cache"):
            raise DistilleryError(
                f"The {role} model ({type(model).__name__}) cannot generate; speculative decoding needs two "
                "causal language models (GPT-2 family)."
            )
    if target.config.vocab_size != draft.config.vocab_size:
        raise DistilleryError(
            f"The draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
            f"({target.config.vocab_size}); use a draft trained with the target's tokenizer."
        )
    if input_ids.dim() != 2 or input_ids.size(0) != 1 or input_ids.size(1) == 0:
        raise ConfigError(
            f"speculative decoding takes one prompt, input_ids of shape (1, length >= 1), got "
            f"{tuple(input_ids.shape)}."
        )
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k (tokens drafted per round) must be a positive integer, got {k!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    for role, model in (("target", target), ("draft", draft)):
        positions = model.config.n_positions
        if input_ids.size(1) + max_new_tokens > positions:
            raise ConfigError(
                f"The prompt ({input_ids.size(1)} tokens) plus {max_new_tokens} new tokens exceeds the {role} "
                f"model's {positions} positions; lower max_new_tokens."
            )
