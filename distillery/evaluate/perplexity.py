"""Perplexity of a language model on a text file, scored as the file is.

Causal LMs use the sliding-window method of Hugging Face's "Perplexity of fixed-length models"
guide: windows of `max_length` tokens start every `stride` tokens; the first window is scored
whole, each later one scores only the tokens no earlier window scored, with the tokens before
them as context. The first token of the text is never scored (nothing predicts it). The
perplexity reported is exactly the guide's number, including its token count, which counts
`valid targets - 1` per window (the guide subtracts the label shift in every window, though
only the first loses a token to it); `scored_tokens` and `nll_sum` are the exact figures.

The lm-evaluation-harness figures for WikiText are computed from the exact total NLL over the
whole file taken as one document:
word_perplexity = exp(nll_sum / words) with words = len(re.split(r"\\s+", text)),
byte_perplexity = exp(nll_sum / bytes) and bits_per_byte = nll_sum / bytes / ln 2 with bytes the
UTF-8 length of the text.

Masked LMs get pseudo-perplexity (Salazar et al., 2020): every token is masked in turn and scored
from both sides, exp(-mean log P(token | rest)); windows and strides as above, each window
wrapped in <s> ... </s>, and the first token is scored too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distillery.models.common import DistilleryError, plural


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; the last `targets` of them are new targets."""

    begin: int
    end: int
    targets: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows: begin = 0, stride, 2*stride, ...; stop at the first that reaches the end."""
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def check_window(num_tokens: int, max_length: int, stride: int, model_max: int, source: str,
                 length_flag: str = "--max-length") -> None:
    """One sentence for each way the window arguments cannot work; `length_flag` is the option that
    sets the window's length in the command at hand."""
    if max_length <= 1:
        raise DistilleryError(f"{length_flag} must be at least 2 tokens, got {max_length}.")
    if max_length > model_max:
        raise DistilleryError(
            f"{length_flag} {max_length} exceeds the model's {model_max} positions; pass {length_flag} {model_max} "
            "or less."
        )
    if not 0 < stride <= max_length:
        raise DistilleryError(
            f"--stride {stride} must be between 1 and {length_flag} ({max_length}); a larger stride skips tokens."
        )
    if num_tokens < 2:  # one token predicts nothing (and a whitespace-only file may have none)
        raise DistilleryError(f"{source} holds {plural(num_tokens, 'token')}, too few for a perplexity; pass a longer text.")
    if num_tokens < max_length:
        raise DistilleryError(
            f"{source} is {num_tokens} tokens long, shorter than one window of {max_length}; "
            f"use a longer file or pass {length_flag} {num_tokens} or less."
        )


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of the same length and target count, at most batch_size per batch."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0].end - last[0].begin, last[0].targets) == (
            w.end - w.begin, w.targets
        ):
            last.append(w)
        else:
            batches.append([w])
    return batches


@torch.no_grad()
def causal_window_nlls(model, ids: torch.Tensor, windows: list[Window], batch_size: int,
                       progress: bool = False) -> list[torch.Tensor]:
    """Per-token NLL (float64) of each window's new targets, in window order."""
    out: list[torch.Tensor] = []
    for batch in tqdm(_batches(windows, batch_size), desc="perplexity", disable=not progress):
        length, targets = batch[0].end - batch[0].begin, batch[0].targets
        scored = min(targets, length - 1)  # the window's first token has no prediction
        x = torch.stack([ids[w.begin:w.end] for w in batch]).to(model.device)
        # Logits at positions length-scored-1 .. length-2 predict the last `scored` tokens.
        logits = model(x, logits_to_keep=scored + 1).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, -scored:], reduction="none")
        out.extend(nll.double().cpu())
    return out


@torch.no_grad()
def masked_window_nlls(model, ids: torch.Tensor, windows: list[Window], batch_size: int,
                       bos_id: int, eos_id: int, mask_id: int, progress: bool = False) -> list[torch.Tensor]:
    """Per-token pseudo-NLL of each window's new targets: one masked copy per target, batched."""
    out: list[torch.Tensor] = []
    for w in tqdm(windows, desc="pseudo-perplexity", disable=not progress):
        window = torch.cat([torch.tensor([bos_id]), ids[w.begin:w.end], torch.tensor([eos_id])])
        length = w.end - w.begin
        positions = torch.arange(length - w.targets, length) + 1  # +1 for <s>
        nlls = []
        for chunk in positions.split(batch_size):
            x = window.repeat(len(chunk), 1)
            x[torch.arange(len(chunk)), chunk] = mask_id
            where = torch.zeros_like(x, dtype=torch.bool)
            where[torch.arange(len(chunk)), chunk] = True
            logits = model(x.to(model.device), logits_positions=where.to(model.device)).logits.float()
            nlls.append(F.cross_entropy(logits, window[chunk].to(model.device), reduction="none"))
        out.append(torch.cat(nlls).double().cpu())
    return out


def text_statistics(text: str, nll_sum: float) -> dict[str, float]:
    """lm-evaluation-harness's word perplexity, byte perplexity and bits per byte for one document."""
    words = len(re.split(r"\s+", text))
    num_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": math.exp(nll_sum / words),
        "words": words,
        "byte_perplexity": math.exp(nll_sum / num_bytes),
        "bytes": num_bytes,
        "bits_per_byte": nll_sum / num_bytes / math.log(2),
    }


def perplexity(model, tokenizer, text: str, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8, source: str = "the text", progress: bool = False) -> dict[str, Any]:
    """Perplexity of `model` on `text` (module docstring: which conventions).

    `max_length` defaults to the model's context, `stride` to half of it. `tokenizer` needs
    `encode(text, add_special_tokens=False)` and, for masked LMs, `mask_token_id`,
    `bos_token_id`, `eos_token_id`. Returns perplexity, nll (mean per token, as the guide), tokens
    (the guide's count), scored_tokens and nll_sum (exact), the harness figures and the settings.
    """
    masked = model.task == "masked-lm"
    if model.family != "gpt2" and not masked:
        raise DistilleryError(
            f"perplexity needs a language model head; this checkpoint is a {model.family} {model.task!r} model "
            "(load it with task='masked-lm' for pseudo-perplexity)."
        )
    model_max = model.config.max_tokens - 2 if masked else model.config.n_positions
    max_length = max_length or model_max
    stride = stride or max(1, max_length // 2)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    check_window(len(ids), max_length, stride, model_max, source)
    windows = sliding_windows(len(ids), max_length, stride)
    if masked:
        if tokenizer.mask_token_id is None:
            raise DistilleryError("pseudo-perplexity needs a tokenizer with a mask token; use the model's own tokenizer.")
        nlls = masked_window_nlls(model, ids, windows, batch_size, tokenizer.bos_token_id,
                                  tokenizer.eos_token_id, tokenizer.mask_token_id, progress)
        counts = [len(n) for n in nlls]
    else:
        nlls = causal_window_nlls(model, ids, windows, batch_size, progress)
        counts = [w.targets - 1 for w in windows]  # the guide's count (see the module docstring)
    nll_sum = float(sum(n.sum() for n in nlls))
    guide_nll = sum(float(n.mean()) * c for n, c in zip(nlls, counts) if len(n))
    tokens = sum(counts)
    mean_nll = guide_nll / tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": tokens,
        "scored_tokens": sum(len(n) for n in nlls),
        "nll_sum": nll_sum,
        **text_statistics(text, nll_sum),
        "method": "pseudo-perplexity" if masked else "sliding-window",
        "max_length": max_length,
        "stride": stride,
        "windows": len(windows),
        "text_tokens": len(ids),
    }


def read_text(path: str | Path) -> str:
    """The file's bytes decoded as UTF-8, nothing joined or cleaned."""
    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"{path} does not exist; pass a text file with --data.")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistilleryError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first.") from e
