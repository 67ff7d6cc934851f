"""`make bench`: distillery vs transformers on the distilgpt2, gpt2 and distilroberta-base shapes.

Random weights in the real shapes (speed does not depend on the values), fp32 and int8, batch 1
and 8; prints the report (or JSON with --json). Extra arguments go to `distillery bench`, e.g.
`python bench/bench_decode.py --dtype fp32 --batch 1 --no-reference`. bf16 is left out by default:
on a CPU without native bf16 its products are emulated, 20-40x slower than fp32, and its 8x256
forward passes for one model ran for over 14 minutes (`--dtype fp32,bf16,int8` adds it; on a GPU,
`--device cuda --dtype fp32,bf16`).

With `--compile` (make bench's second run) only the two causal LMs are timed, in fp32: their
decode steps go through torch.compile, which freezes the weights into inductor's own kernels
(`generation/engine.py: compiled_decode_step`); int8 runs slower compiled, and fill-mask does not
use decode steps.
"""

from __future__ import annotations

import sys

from distillery.cli import main

CAUSAL_LMS = ["preset:distilgpt2", "preset:gpt2"]
MODELS = [*CAUSAL_LMS, "preset:distilroberta-base"]
SHAPES = ["--batch", "1,8", "--new-tokens", "32"]
DEFAULTS = ["--dtype", "fp32,int8", *SHAPES]
COMPILED_DEFAULTS = ["--dtype", "fp32", *SHAPES]

if __name__ == "__main__":
    extra = sys.argv[1:]
    if "--compile" in extra:
        sys.exit(main(["bench", *CAUSAL_LMS, *COMPILED_DEFAULTS, *extra]))
    sys.exit(main(["bench", *MODELS, *DEFAULTS, *extra]))
