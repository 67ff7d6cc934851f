"""Model speed, ours against transformers in the same run, on random weights of the real shapes.

- Greedy decoding at batch 1 (distilgpt2 and gpt2 shapes): a prompt of --prompt-tokens random ids,
  --new-tokens generated (EOS disabled so both always generate them all), tokens/s including
  prefill; transformers runs GPT2LMHeadModel.generate(do_sample=False) with the same weights.
- Fill-mask latency (distilroberta-base shape): one call of each pipeline on the card's text,
  tokenization and post-processing included.

Each number is the median of --repeats timed runs after a warm-up, ours and theirs alternating. Goals (issue 2): >= 1.3x
transformers on decoding, >= 2x on fill-mask.

    .venv/bin/python bench/bench_models.py                # everything, a table
    .venv/bin/python bench/bench_models.py --json --only decode --models distilgpt2
    .venv/bin/python bench/bench_models.py --profile      # where our decode step spends its time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillery.generation.config import GenerationConfig  # noqa: E402
from distillery.generation.engine import generate  # noqa: E402
from distillery.generation.quantize import to_inference_layout  # noqa: E402
from distillery.models.checkpoint import build_model, load_hf_state_dict  # noqa: E402
from distillery.models.gpt2 import GPT2Config  # noqa: E402
from distillery.models.roberta import RobertaConfig  # noqa: E402
from distillery.pipelines.fill_mask import FillMaskPipeline  # noqa: E402
from distillery.tokenizer import load_tokenizer  # noqa: E402

FILL_MASK_TEXT = "The man worked as a <mask>."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def median_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each function; runs alternate between them (after one warm-up each), so a
    change in machine load hits all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def gpt2_pair(preset: str, dtype: torch.dtype):
    """(ours, transformers') GPT-2 LM of the preset's shape with the same random weights."""
    import transformers

    config = GPT2Config.from_preset(preset)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf())).eval()
    theirs.generation_config.eos_token_id = None  # always generate every requested token
    theirs.generation_config.pad_token_id = 0
    ours = build_model(config).eval()
    load_hf_state_dict(ours, theirs.state_dict(), source=f"random {preset}")
    ours = ours.to(dtype)
    if dtype == torch.float32:
        ours = to_inference_layout(ours)  # what pipeline("text-generation") decodes with on a CPU
    return ours, theirs.to(dtype)


def bench_decode(preset: str, args: argparse.Namespace) -> dict:
    ours, theirs = gpt2_pair(preset, DTYPES[args.dtype])
    prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False)

    def run_ours():
        return generate(ours, prompt, None, config)

    @torch.inference_mode()
    def run_theirs():
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                               do_sample=False)

    same_tokens = torch.equal(run_ours(), run_theirs())
    t_ours, t_theirs = median_seconds([run_ours, run_theirs], args.repeats)
    ours_tps, theirs_tps = args.new_tokens / t_ours, args.new_tokens / t_theirs
    return {"bench": "greedy-decode", "model": preset, "dtype": args.dtype, "batch": 1,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "ours_tokens_per_s": ours_tps, "transformers_tokens_per_s": theirs_tps,
            "speedup": ours_tps / theirs_tps, "same_tokens": same_tokens}


def bench_fill_mask(args: argparse.Namespace) -> dict:
    import transformers
    from tokenizers import AddedToken

    vocab_dir = Path(args.roberta_vocab)
    config = RobertaConfig.from_preset("distilroberta-base")
    theirs_model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**config.to_hf())).eval()
    ours_model = build_model(config, "masked-lm").eval()
    load_hf_state_dict(ours_model, theirs_model.state_dict(), source="random distilroberta-base")
    dtype = DTYPES[args.dtype]
    ours_model = ours_model.to(dtype)
    if dtype == torch.float32:
        ours_model = to_inference_layout(ours_model)  # as pipeline("fill-mask") loads it on a CPU
    ours = FillMaskPipeline(ours_model, load_tokenizer(vocab_dir))
    their_tokenizer = transformers.RobertaTokenizer(
        str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False),
    )
    theirs = transformers.pipeline("fill-mask", model=theirs_model.to(dtype), tokenizer=their_tokenizer)
    a, b = ours(FILL_MASK_TEXT), theirs(FILL_MASK_TEXT)
    same_tokens = [p["token"] for p in a] == [p["token"] for p in b]
    t_ours, t_theirs = median_seconds([lambda: ours(FILL_MASK_TEXT), lambda: theirs(FILL_MASK_TEXT)], args.repeats)
    return {"bench": "fill-mask", "model": "distilroberta-base", "dtype": args.dtype, "text": FILL_MASK_TEXT,
            "ours_ms": 1e3 * t_ours, "transformers_ms": 1e3 * t_theirs, "speedup": t_theirs / t_ours,
            "same_tokens": same_tokens}


def profile_decode(preset: str, args: argparse.Namespace) -> None:
    """Our greedy decode under torch.profiler: the operators that take the time, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    ours, _ = gpt2_pair(preset, DTYPES[args.dtype])
    prompt = torch.randint(0, ours.config.vocab_size, (1, args.prompt_tokens))
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False)
    generate(ours, prompt, None, config)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(ours, prompt, None, config)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["decode", "fill-mask"], help="run one of the two benchmarks")
    parser.add_argument("--models", nargs="+", default=["distilgpt2", "gpt2"], help="GPT-2 presets to decode with")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--roberta-vocab", default=str(ROOT.parent / "shared/data/tokenizers/roberta"),
                        help="folder with RoBERTa's vocab.json and merges.txt")
    parser.add_argument("--profile", action="store_true", help="profile our decode for the first model and stop")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.profile:
        profile_decode(args.models[0], args)
        return 0

    results = []
    if args.only in (None, "decode"):
        results += [bench_decode(preset, args) for preset in args.models]
    if args.only in (None, "fill-mask"):
        results.append(bench_fill_mask(args))
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results},
                         indent=2))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    for r in results:
        if r["bench"] == "greedy-decode":
            print(f"decode {r['model']:<11} batch 1, {r['prompt_tokens']}+{r['new_tokens']} tokens: "
                  f"ours {r['ours_tokens_per_s']:7.1f} tok/s   transformers {r['transformers_tokens_per_s']:7.1f} "
                  f"tok/s   x{r['speedup']:.2f}   same tokens: {r['same_tokens']}")
        else:
            print(f"fill-mask {r['model']} {r['text']!r}: ours {r['ours_ms']:7.2f} ms   transformers "
                  f"{r['transformers_ms']:7.2f} ms   x{r['speedup']:.2f}   same tokens: {r['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
