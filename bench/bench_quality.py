"""What smaller weights cost: perplexity of a trained model on WikiText-2 in fp32, bf16 and int8.

    python bench/bench_quality.py MODEL_DIR [--chars 200000] [--data PATH]

MODEL_DIR needs a tokenizer (tokenizer.json or vocab.json + merges.txt). The goal: int8 within
1 % of fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distillery.cli import print_json
from distillery.evaluate.perplexity import read_text
from distillery.generation.bench import perplexity_by_dtype

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", default=str(WIKITEXT))
    parser.add_argument("--chars", type=int, default=200_000, help="score the first N characters (default 200000)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--stride", type=int, default=None)
    args = parser.parse_args()
    text = read_text(args.data)[: args.chars]
    result = perplexity_by_dtype(args.model, text, max_length=args.max_length, stride=args.stride)
    print_json(result)
    worst = max(v for d, v in result["relative_to_fp32"].items() if d != "fp32")
    print(f"worst relative perplexity vs fp32: {100 * (worst - 1):+.2f}% (goal: int8 within 1%)")


if __name__ == "__main__":
    main()
