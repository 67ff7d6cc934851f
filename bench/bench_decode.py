"""`make bench`: distillery vs transformers on the distilgpt2, gpt2 and distilroberta-base shapes.

Random weights in the real shapes (speed does not depend on the values), every dtype, batch 1
and 8; prints the report (or JSON with --json). Extra arguments go to `distillery bench`, e.g.
`python bench/bench_decode.py --dtype fp32 --batch 1 --no-reference`.
"""

from __future__ import annotations

import sys

from distillery.cli import main

MODELS = ["preset:distilgpt2", "preset:gpt2", "preset:distilroberta-base"]
DEFAULTS = ["--dtype", "fp32,bf16,int8", "--batch", "1,8", "--new-tokens", "32"]

if __name__ == "__main__":
    sys.exit(main(["bench", *MODELS, *DEFAULTS, *sys.argv[1:]]))
