"""Speculative decoding: a student drafting for its teacher vs the teacher alone, greedy, batch 1.

    python bench/bench_speculative.py TEACHER STUDENT [--k 4] [--new-tokens 64] [--dtype fp32]
                                      [--draft-dtype int8] [--compile]

Checks that the output is the teacher's own greedy output and prints tokens/s of both and the
acceptance rate. TEACHER and STUDENT may be folders, hub ids or preset:NAME (random weights: the
timing is real, the acceptance rate is not).

It also times the three passes a round is made of (a teacher step, the teacher's pass over k + 1
tokens, a draft step) and prints what they allow: with acceptance a, a round yields
(1 - a^(k+1)) / (1 - a) tokens for k draft steps and one verify pass, so the speed-up over the
teacher alone is that many teacher steps divided by the round's cost; and the acceptance that
1.5x would take. With presets this is the figure for real shapes, whose acceptance only trained
weights can give. `--compile` does the same against the teacher's passes through torch.compile
(fp32, weights frozen into inductor's kernels, as `generate --compile` decodes): the faster the
teacher alone, the less a draft can add.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from distillery.generation.bench import best_time, load_bench_model
from distillery.generation.config import GenerationConfig
from distillery.generation.engine import compile_with_frozen_weights, generate
from distillery.generation.quantize import prepare_for_inference, quantize_model
from distillery.generation.speculative import speculative_generate

PROMPT = "The history of the city begins in the early Middle Ages, when"


def prompt_ids(model_name: str, vocab_size: int) -> torch.Tensor:
    """The prompt through the model's tokenizer; random ids for models without one (presets)."""
    from distillery.tokenizer import TokenizerError, load_tokenizer

    if not model_name.startswith("preset:"):
        try:
            return torch.tensor([load_tokenizer(model_name).encode(PROMPT)])
        except TokenizerError:
            pass
    return torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))


def inference_model(name: str, dtype: str) -> torch.nn.Module:
    """As the pipelines decode: `prepare_for_inference` of the model loaded in `dtype`."""
    model = load_bench_model(name)
    if dtype == "bf16":
        model = quantize_model(model, dtype)
    return prepare_for_inference(model, int8=dtype == "int8")


def model_pass(model: torch.nn.Module, ids: torch.Tensor, cache, keep: int) -> torch.Tensor:
    return model(ids, cache=cache, logits_to_keep=keep).logits


def pass_ms(model: torch.nn.Module, prompt: torch.Tensor, tokens: int, repeats: int = 20,
            forward: Callable = model_pass) -> float:
    """Milliseconds of one forward over `tokens` new tokens after `prompt`, from its KV cache."""
    new = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = model.new_cache(1, prompt.size(1) + tokens)
        model(prompt, cache=cache)

        def one_pass() -> None:
            cache.length = prompt.size(1)
            forward(model, new, cache, 1 if tokens == 1 else 0)
        return best_time(one_pass, repeats) * 1e3


def compiled_pass_ms(name: str, prompt: torch.Tensor, k: int) -> tuple[float, float]:
    """(one-token step, pass over k + 1 tokens) in ms of the fp32 teacher through torch.compile, with
    the weights frozen into inductor's kernels as `generate(..., compile=True)` runs its steps."""
    model = load_bench_model(name).eval()  # plain nn.Linear: inductor lays the weights out itself
    compiled = compile_with_frozen_weights(model_pass, model.device)
    return pass_ms(model, prompt, 1, forward=compiled), pass_ms(model, prompt, k + 1, forward=compiled)


def modelled_speedup(acceptance: float, k: int, step_ms: float, verify_ms: float, draft_ms: float) -> float:
    """Teacher steps a round replaces over what the round costs, at a given acceptance rate."""
    tokens = k + 1 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens * step_ms / (k * draft_ms + verify_ms)


def acceptance_needed(target: float, k: int, step_ms: float, verify_ms: float, draft_ms: float) -> float | None:
    """The lowest acceptance rate giving `target`x (bisection; the speed-up grows with it), or None."""
    if modelled_speedup(1.0, k, step_ms, verify_ms, draft_ms) < target:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if modelled_speedup(mid, k, step_ms, verify_ms, draft_ms) < target else (low, mid)
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("student")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or int8 (the teacher; the student too "
                        "unless --draft-dtype)")
    parser.add_argument("--draft-dtype", help="fp32, bf16 or int8 for the student (default: --dtype)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each")
    parser.add_argument("--compile", action="store_true", help="also time the fp32 teacher's passes through "
                        "torch.compile (CPU) and model the round against the compiled teacher alone")
    args = parser.parse_args()
    teacher = inference_model(args.teacher, args.dtype)
    student = inference_model(args.student, args.draft_dtype or args.dtype)
    ids = prompt_ids(args.teacher, teacher.config.vocab_size)

    generate(teacher, ids, config=GenerationConfig(max_new_tokens=2))  # warm up
    alone_s = spec_s = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        alone = generate(teacher, ids, config=GenerationConfig(max_new_tokens=args.new_tokens))
        alone_s = min(alone_s, time.perf_counter() - start)
        start = time.perf_counter()
        tokens, stats = speculative_generate(teacher, student, ids, args.new_tokens, k=args.k)
        spec_s = min(spec_s, time.perf_counter() - start)

    same = tokens.tolist() == alone.tolist()
    print(f"teacher alone: {args.new_tokens / alone_s:.1f} tok/s")
    print(f"speculative (k={args.k}): {args.new_tokens / spec_s:.1f} tok/s, {alone_s / spec_s:.2f}x, "
          f"acceptance {stats['acceptance_rate']:.2f}, {stats['target_passes']} teacher passes")
    print(f"output identical to the teacher's greedy output: {same}")

    step, verify, draft = pass_ms(teacher, ids, 1), pass_ms(teacher, ids, args.k + 1), pass_ms(student, ids, 1)
    rate = stats["acceptance_rate"]
    print(f"passes: teacher step {step:.2f} ms, teacher over {args.k + 1} tokens {verify:.2f} ms, "
          f"draft step {draft:.2f} ms ({draft / step:.2f} of a teacher step)")
    print("modelled from them: " + round_model(rate, args.k, step, verify, draft))
    if args.compile:
        step, verify = compiled_pass_ms(args.teacher, ids, args.k)
        print(f"compiled teacher: step {step:.2f} ms, over {args.k + 1} tokens {verify:.2f} ms; against it alone "
              + round_model(rate, args.k, step, verify, draft))


def round_model(rate: float, k: int, step: float, verify: float, draft: float) -> str:
    """The modelled speed-up at the measured acceptance, and the acceptance 1.5x needs."""
    needed = acceptance_needed(1.5, k, step, verify, draft)
    return (f"{modelled_speedup(rate, k, step, verify, draft):.2f}x at acceptance {rate:.2f}; 1.5x "
            + (f"needs acceptance {needed:.2f}" if needed is not None
               else "is out of reach even if every drafted token were kept"))

if __name__ == "__main__":
    main()
