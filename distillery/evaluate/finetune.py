"""Causal-LM fine-tuning on a text file, as the DistilGPT2 card fine-tuned on WikiText-103's train set
before reporting its perplexity.

The recipe is transformers' run_clm: tokenize the whole file, cut it into blocks of `block_size`
tokens (the remainder dropped), train on shuffled blocks with AdamW, linear warm-up and linear
decay; then, when an evaluation file is given, the sliding-window perplexity of distillery.evaluate.perplexity.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distillery.evaluate.glue import check_finite_weights, finite_loss, warmup_linear_decay
from distillery.models.common import DistilleryError


@dataclass
class CausalFinetuneSettings:
    epochs: int = 1
    block_size: int = 512
    batch_size: int = 8
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_steps: int | None = None  # stop early after this many optimizer steps
    seed: int = 42
    max_grad_norm: float = 1.0


def text_blocks(ids: list[int], block_size: int) -> torch.Tensor:
    """(N, block_size) consecutive blocks of the token stream; the last partial block is dropped."""
    n = len(ids) // block_size
    if n == 0:
        raise DistilleryError(
            f"the training text is {len(ids)} tokens, less than one block of {block_size}; "
            "pass a longer file or a smaller --block-size."
        )
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def finetune_causal_lm(model, tokenizer, train_text: str, settings: CausalFinetuneSettings,
                       progress: bool = True) -> dict[str, Any]:
    """Train `model` (a GPT-2) in place on `train_text`; returns steps, blocks and the loss curve."""
    if model.family != "gpt2":
        raise DistilleryError(
            f"finetune trains causal LMs; this is a {model.family} {model.task!r} model (use `distillery glue`)."
        )
    settings.block_size = min(settings.block_size, model.config.n_positions)
    blocks = text_blocks(tokenizer.encode(train_text, add_special_tokens=False), settings.block_size)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(blocks) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    if settings.max_steps:
        total = min(total, settings.max_steps)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.learning_rate)
    warmup = int(settings.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_linear_decay(s, warmup, total))
    losses: list[dict[str, float]] = []
    step = 0
    model.train()
    with tqdm(total=total, desc="finetune", disable=not progress) as bar:
        while step < total:
            order = list(range(len(blocks)))
            rng.shuffle(order)
            for start in range(0, len(order), settings.batch_size):
                if step == total:
                    break
                x = blocks[order[start:start + settings.batch_size]].to(model.device)
                logits = model(x).logits[:, :-1].float()
                loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
                finite_loss(loss, step + 1, settings.learning_rate)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append({"step": step, "loss": loss.item()})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
    check_finite_weights(model, settings.learning_rate)
    model.eval()
    return {"steps": step, "blocks": len(blocks), "tokens_per_epoch": blocks.numel(),
            "final_train_loss": losses[-1]["loss"], "losses": losses, "settings": vars(settings)}
