"""Student against teacher in one run: size, decoding speed, full-sequence encoding throughput.

Decoding (causal LMs only): batch 1, a 16-token prompt prefilled into a preallocated KV cache, then
`new_tokens` greedy steps; tokens/s counts the generated tokens. Encoding: a forward pass over a
(batch_size, seq_len) block of random token ids, tokens/s = batch_size * seq_len / time. Each
figure is the median of `repeats` timed runs after one warm-up run. Ratios are student/teacher
for parameters and teacher time / student time for speed (2.0 = "twice as fast").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

PROMPT_TOKENS = 16


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up (CUDA synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill then `new_tokens` single-token steps through the KV cache; returns the new tokens."""
    cache = model.new_cache(prompt.size(0), prompt.size(1) + new_tokens)
    logits = model(prompt, cache=cache, logits_to_keep=1).logits
    out = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits = model(token, cache=cache, logits_to_keep=1).logits
    return torch.cat(out, dim=1)


def measure_model(model, batch_size: int, seq_len: int, new_tokens: int, repeats: int,
                  seed: int = 0) -> dict[str, Any]:
    """Parameters, layers, encoding tokens/s and (causal LMs) decoding tokens/s and ms per token."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    max_tokens = model.config.n_positions if model.family == "gpt2" else model.config.max_tokens
    seq_len = min(seq_len, max_tokens)
    block = torch.randint(5, vocab, (batch_size, seq_len), generator=generator).to(model.device)
    with torch.no_grad():
        encode_s = median_seconds(lambda: model(block), repeats, model.device)
    result: dict[str, Any] = {
        "parameters": model.num_parameters(),
        "layers": model.config.n_layer,
        "encode_shape": [batch_size, seq_len],
        "encode_seconds": encode_s,
        "encode_tokens_per_s": batch_size * seq_len / encode_s,
        "decode_tokens_per_s": None,
        "decode_ms_per_token": None,
    }
    if model.family == "gpt2":
        new_tokens = min(new_tokens, max_tokens - PROMPT_TOKENS)
        prompt = block[:1, :PROMPT_TOKENS]
        decode_s = median_seconds(lambda: greedy_decode(model, prompt, new_tokens), repeats, model.device)
        result.update(decode_new_tokens=new_tokens, decode_tokens_per_s=new_tokens / decode_s,
                      decode_ms_per_token=1000 * decode_s / new_tokens)
    return result


def compare_speed(student: str, teacher: str, batch_size: int = 8, seq_len: int = 256, new_tokens: int = 64,
                  repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Measure both models with the same settings; `ratios` says how much smaller and faster the student is."""
    from distillery.models import load_model

    rows = {}
    for name, path in (("student", student), ("teacher", teacher)):
        model = load_model(path, device=device)
        rows[name] = {"model": path, **measure_model(model, batch_size, seq_len, new_tokens, repeats)}
        del model
    s, t = rows["student"], rows["teacher"]
    ratios = {"parameters": s["parameters"] / t["parameters"],
              "encode_speedup": s["encode_tokens_per_s"] / t["encode_tokens_per_s"]}
    if s["decode_tokens_per_s"] and t["decode_tokens_per_s"]:
        ratios["decode_speedup"] = s["decode_tokens_per_s"] / t["decode_tokens_per_s"]
    return {**rows, "ratios": ratios, "device": device, "threads": torch.get_num_threads(),
            "settings": {"batch_size": batch_size, "seq_len": seq_len, "new_tokens": new_tokens, "repeats": repeats}}
