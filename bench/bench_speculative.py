"""Speculative decoding: a student drafting for its teacher vs the teacher alone, greedy, batch 1.

    python bench/bench_speculative.py TEACHER STUDENT [--k 4] [--new-tokens 64] [--dtype fp32]
                                      [--draft-dtype int8]

Checks that the output is the teacher's own greedy output and prints tokens/s of both and the
acceptance rate. TEACHER and STUDENT may be folders, hub ids or preset:NAME (random weights: the
timing is real, the acceptance rate is not).
"""

from __future__ import annotations

import argparse
import time

import torch

from distillery.generation.bench import load_bench_model
from distillery.generation.config import GenerationConfig
from distillery.generation.engine import generate
from distillery.generation.quantize import quantize_model, to_inference_layout
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
    """As the pipelines decode: int8 quantised, or float weights in the inference layout."""
    model = quantize_model(load_bench_model(name), dtype)
    return model if dtype == "int8" else to_inference_layout(model)


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


if __name__ == "__main__":
    main()
