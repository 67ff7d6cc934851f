"""`distillery bench`: speed of models on this machine, next to transformers on the same weights."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from distillery import cli_types
from distillery.cli import add_command, print_json
from distillery.generation.bench import BenchSettings, check_preset, format_report, run_bench
from distillery.generation.quantize import QUANTIZE_DTYPES
from distillery.models.common import DistilleryError

MAX_BATCH = 4096  # larger batches of a timing run are typos, and would only fail allocating


def register(subparsers) -> None:
    p = add_command(subparsers, "bench", bench_command)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folder, hub id, or preset:NAME (random weights: preset:distilgpt2, preset:gpt2, "
                        "preset:distilroberta-base, ...)")
    p.add_argument("--dtype", default="fp32", help=f"comma-separated, from {','.join(QUANTIZE_DTYPES)} (default fp32)")
    p.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=cli_types.int_range(2), default=32,
                   help="tokens decoded per timed run, lowered to what the model's positions leave (default 32)")
    p.add_argument("--prompt-tokens", type=cli_types.positive_int, default=16, help="prompt length (default 16)")
    p.add_argument("--forward-shape", default="8x256",
                   help="BATCHxTOKENS of the full-forward timing, tokens lowered to the model's positions "
                        "(default 8x256)")
    p.add_argument("--repeats", type=cli_types.positive_int, default=3,
                   help="timed runs per figure; the fastest counts (default 3)")
    p.add_argument("--threads", type=cli_types.int_range(1, 1024), default=None,
                   help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", type=cli_types.device, help="cpu (default) or cuda[:N]: bench that GPU, its memory bandwidth "
                   "included (fp32 and bf16; int8 is CPU only)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --device cuda: our decode steps replayed as one CUDA graph each")
    p.add_argument("--compile", action="store_true",
                   help="our decode steps through torch.compile (GPT-2 family; the compile time is reported apart)")
    p.add_argument("--linear-layout", action="store_true",
                   help="keep nn.Linear's (out, in) float weights instead of the faster (in, out) decode layout")
    p.add_argument("--no-reference", action="store_true", help="do not time transformers on the same weights")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def bench_command(args: argparse.Namespace) -> int:
    """Measure decoding speed, time to first token, fill-mask latency and memory for each model and dtype.

    First measures this machine's memory bandwidth: decoding one token reads every weight once, so
    bandwidth / bytes of weights is the speed limit, and the report gives the fraction of it reached.
    With transformers installed (and without --no-reference), transformers runs the same weights
    in the same process and the report gives the speedup. With several causal LMs, each is compared
    with the largest (student vs teacher) for decoding and for a full forward pass.
    """
    settings = BenchSettings(
        dtypes=tuple(_split(args.dtype, str, "--dtype")),
        batch_sizes=tuple(_split(args.batch, int, "--batch")),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        forward_shape=_shape(args.forward_shape),
        repeats=args.repeats,
        reference=not args.no_reference,
        threads=args.threads,
        inference_layout=not args.linear_layout,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
    )
    for spec in args.models:
        check_preset(spec)  # before the progress bar starts
    with tqdm(desc="bench", unit=" stage") as bar:
        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        report = run_bench(args.models, settings, progress)
    if args.json:
        print_json(report)
    else:
        print(format_report(report))
    return 0


def _split(value: str, kind: type, flag: str) -> list:
    try:
        items = [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise DistilleryError(f"{flag} {value!r} is not a comma-separated list of {kind.__name__}s.") from e
    if not items:
        raise DistilleryError(f"{flag} needs at least one value.")
    if kind is int and not all(1 <= i <= MAX_BATCH for i in items):
        raise DistilleryError(f"{flag} {value!r} must hold batch sizes from 1 to {MAX_BATCH}.")
    return items


def _shape(value: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) > MAX_BATCH:
        raise DistilleryError(f"--forward-shape {value!r} must be BATCHxTOKENS with a batch from 1 to {MAX_BATCH}, "
                              "e.g. 8x256.")
    return int(parts[0]), int(parts[1])
