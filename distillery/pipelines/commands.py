"""Commands that run a model: `generate`, `fill-mask`, `embed` and `info`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery import cli_types
from distillery.cli import add_command, print_json
from distillery.models.common import DistilleryError, plural

WEIGHT_SUFFIXES = (".safetensors", ".bin")
POOLING_CHOICES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def register(subparsers) -> None:
    p = add_command(subparsers, "generate", generate_command)
    p.add_argument("model", metavar="MODEL", help="model folder or hub id (a GPT-2 family checkpoint)")
    p.add_argument("prompt", metavar="PROMPT", type=cli_types.text, help="text to continue")
    p.add_argument("--max-length", type=cli_types.positive_int, help="total length in tokens, prompt included")
    p.add_argument("--max-new-tokens", type=cli_types.positive_int,
                   help="tokens to generate (overrides --max-length; default: the checkpoint's, else 256, "
                        "lowered to what the model's positions leave after the prompt)")
    p.add_argument("--num-return-sequences", type=cli_types.positive_int, help="continuations to return")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", default=None,
                          help="sample (the checkpoint's default decides when neither flag is given)")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    p.add_argument("--temperature", type=cli_types.non_negative_float,
                   help="softmax temperature when sampling (0: greedy)")
    p.add_argument("--top-k", type=cli_types.non_negative_int, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=cli_types.float_range(0.0, 1.0, low_open=True),
                   help="sample among the smallest set of tokens with this mass (1: off)")
    p.add_argument("--repetition-penalty", type=cli_types.positive_float,
                   help="penalty for tokens already present (1 = none)")
    p.add_argument("--seed", type=cli_types.seed, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", metavar="TEXT", type=cli_types.text,
                   help="stop when this text appears (repeatable)")
    p.add_argument("--draft", metavar="MODEL", type=cli_types.non_empty,
                   help="speculative decoding: a smaller model with the same "
                   "tokenizer drafts tokens that MODEL verifies (same output as MODEL alone)")
    p.add_argument("--draft-k", type=cli_types.positive_int, default=4,
                   help="tokens drafted per round with --draft (default: 4)")
    p.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights of the --draft model (default: --dtype); int8 makes drafting cheaper")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile: compiles first (15-35 s for distilgpt2 on a "
                        "2-core CPU), then decodes about 1.25x faster there")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps as one CUDA graph (with --device cuda; fewer kernel launches)")
    p.add_argument("--no-full-text", action="store_true", help="print only the generated part, not the prompt")
    p.add_argument("--truncation", action="store_true", help="keep the end of a prompt too long for the model")
    _add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add_command(subparsers, "fill-mask", fill_mask_command)
    p.add_argument("model", metavar="MODEL",
                   help="model folder or hub id (a RoBERTa, BERT or DistilBERT masked language model)")
    p.add_argument("text", metavar="TEXT", type=cli_types.text,
                   help="text with one or more mask tokens (<mask> for RoBERTa, [MASK] for BERT)")
    p.add_argument("--top-k", type=cli_types.positive_int, default=5, help="predictions per mask (default: 5)")
    p.add_argument("--targets", nargs="+", metavar="WORD", type=cli_types.text,
                   help="score only these words or tokens")
    p.add_argument("--truncation", action="store_true", help="cut a text longer than the model's positions")
    _add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add_command(subparsers, "embed", embed_command)
    p.add_argument("model", metavar="MODEL", help="model folder or hub id (a sentence-transformers folder gives "
                   "one embedding per text)")
    p.add_argument("text", metavar="TEXT", nargs="+", type=cli_types.text, help="text(s) to embed")
    p.add_argument("--pooling", choices=list(POOLING_CHOICES),
                   help="pool each text's token features into one embedding (default: the sentence-transformers "
                        "folder's own pooling; other models print per-token features)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise sentence embeddings")
    p.add_argument("--batch-size", type=cli_types.positive_int, default=32,
                   help="texts per batch for sentence embeddings (default: 32)")
    p.add_argument("--truncation", action="store_true", help="cut texts longer than the model's positions")
    _add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: embeddings (one vector per text) for "
                   "sentence output, tokens and token_embeddings (one vector per token) otherwise")

    p = add_command(subparsers, "info", info_command)
    p.add_argument("model", metavar="MODEL", help="model folder or hub id")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights: float32 (default), bfloat16, float16, or int8 (CPU: int8 weights and activations)")
    p.add_argument("--device", default="cpu", type=cli_types.device, help="torch device (default: cpu)")


def generate_command(args: argparse.Namespace) -> int:
    """Continue a prompt with a causal language model, as transformers' text-generation pipeline.

    Options left unset take the checkpoint's generation settings, then transformers' pipeline defaults.
    Example: distillery generate distilgpt2 "Hello, I'm a language model" --max-length 20 \\
             --num-return-sequences 5 --seed 42
    """
    from distillery.pipelines import pipeline, set_seed

    options = {
        "max_length": args.max_length, "max_new_tokens": args.max_new_tokens,
        "num_return_sequences": args.num_return_sequences, "do_sample": args.do_sample,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty, "stop": args.stop,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.no_full_text:
        options["return_full_text"] = False
    if args.truncation:
        options["truncation"] = True
    generator = pipeline("text-generation", model=args.model, device=args.device, dtype=args.dtype,
                         compile=args.compile, cuda_graphs=args.cuda_graphs)
    if args.seed is not None:
        set_seed(args.seed)
    if args.draft:
        return _speculative(args, generator, options)
    _fit_new_tokens(generator, args.prompt, options)
    if args.compile:  # long and silent otherwise: nothing can report torch.compile's progress
        print("compiling the decode step with torch.compile (15-40 s on a CPU the first time)...", file=sys.stderr)
    outputs = generator(args.prompt, **options)
    if args.json:
        print_json(outputs)
        return 0
    for i, output in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- {i + 1} ---")
        print(output["generated_text"])
    return 0


def _fit_new_tokens(generator, prompt: str, options: dict[str, Any]) -> None:
    """With no length asked for, lower the default number of new tokens (the checkpoint's, else the
    pipeline's 256) to what the model's positions leave after the prompt, and say so once."""
    if "max_length" in options or "max_new_tokens" in options or options.get("truncation"):
        return
    config = generator.generation_config(**{k: v for k, v in options.items()
                                            if k not in ("stop", "return_full_text", "truncation")})
    prompt_length = max(1, len(generator.tokenizer.encode(prompt)))  # an empty prompt starts from BOS
    positions = generator.model.config.n_positions
    room = positions - prompt_length
    if room < 1 or (config.max_length is not None and config.max_new_tokens is None):
        return  # the pipeline's own sentence says what does not fit
    if config.new_tokens_for(prompt_length) > room:
        options["max_new_tokens"] = room
        print(f"note: generating at most {room} new tokens, what the model's {positions} positions leave after "
              "the prompt (--max-new-tokens sets another number)", file=sys.stderr)


def _speculative(args: argparse.Namespace, generator, options: dict[str, Any]) -> int:
    """`generate --draft`: the draft model proposes tokens, the target verifies them in one pass."""
    from distillery.generation.quantize import prepare_for_inference
    from distillery.generation.speculative import speculative_generate
    from distillery.models.checkpoint import load_model
    from distillery.pipelines.text_generation import cut_at_stop

    if args.draft_k < 1:
        raise DistilleryError(f"--draft-k must be at least 1 (tokens drafted per round), got {args.draft_k}.")
    unsupported = [k for k in ("repetition_penalty", "num_return_sequences") if options.get(k, 1) != 1]
    unsupported += [k for k in ("compile", "cuda_graphs") if getattr(args, k)]
    if unsupported:
        flags = [f"--{k.replace('_', '-')}" for k in unsupported]
        raise DistilleryError(f"--draft does not support {', '.join(flags)}; leave {'them' if len(flags) > 1 else 'it'} out.")
    config = generator.generation_config(**{k: v for k, v in options.items()
                                            if k not in ("stop", "return_full_text", "truncation")})
    draft_dtype = args.draft_dtype or args.dtype
    draft = load_model(args.draft, device=args.device, dtype=None if draft_dtype == "int8" else draft_dtype)
    draft = prepare_for_inference(draft, int8=draft_dtype == "int8")  # as pipeline() prepares the target
    prompt = generator.tokenizer.encode(args.prompt)
    if not prompt:
        raise DistilleryError("--draft needs a non-empty PROMPT.")
    input_ids = torch.tensor([prompt])
    tokens, stats = speculative_generate(
        generator.model, draft, input_ids, config.new_tokens_for(len(prompt)), k=args.draft_k,
        do_sample=config.do_sample, temperature=config.temperature or 1.0, top_k=config.top_k or 0,
        top_p=config.top_p, eos_token_id=config.eos_token_ids[0] if config.eos_token_ids else None,
    )
    new_text = generator.tokenizer.decode(tokens[0, len(prompt):].tolist(), skip_special_tokens=True)
    new_text = cut_at_stop(new_text, args.stop or [])
    text = new_text if args.no_full_text else args.prompt + new_text
    if args.json:  # a list of records, as without --draft, each with the drafting statistics
        print_json([{"generated_text": text, **stats}])
        return 0
    print(text)
    print(f"acceptance rate {stats['acceptance_rate']:.2f} ({int(stats['accepted'])}/{int(stats['drafted'])} "
          f"drafted tokens kept, {int(stats['target_passes'])} target passes)", file=sys.stderr)
    return 0


def fill_mask_command(args: argparse.Namespace) -> int:
    """Predict the tokens behind each mask token in a text, as transformers' fill-mask pipeline.

    Example: distillery fill-mask distilroberta-base "The man worked as a <mask>."
             distillery fill-mask distilbert-base-uncased "The man worked as a [MASK]."
    """
    from distillery.pipelines import pipeline

    unmasker = pipeline("fill-mask", model=args.model, device=args.device, dtype=args.dtype)
    result = unmasker(args.text, top_k=args.top_k, targets=args.targets,
                      tokenizer_kwargs={"truncation": True} if args.truncation else None)
    if args.json:
        print_json(result)
        return 0
    per_mask = result if result and isinstance(result[0], list) else [result]
    for i, predictions in enumerate(per_mask):
        if len(per_mask) > 1:
            print(f"mask {i + 1}:")
        for p in predictions:
            print(f"{p['score']:<10.4g}  {p['token_str']!r:<16}  {p['sequence']}")
    return 0


def embed_command(args: argparse.Namespace) -> int:
    """Sentence embeddings (sentence-transformers folders, or --pooling), else per-token features.

    A sentence-transformers folder (modules.json) gives one vector per text, pooled and normalised
    as sentence-transformers does. Any other encoder gives the base model's last hidden state per
    token (transformers' feature-extraction), or one pooled vector per text with --pooling.
    Prints the shape and the first values; --json prints every value, in one shape either way:
    {"model", "texts", "output_value" ("sentence_embedding" or "token_embeddings"), "pooling",
    "normalized", "dimensions", "embeddings" (one vector per text, or null), "tokens" and
    "token_embeddings" (per text, its tokens and one vector per token, or null)}.
    """
    from distillery.models.checkpoint import resolve_model_dir
    from distillery.models.sentence_encoder import is_sentence_transformers_folder

    # A hub id resolves through the cache first, so a missing model is named as missing.
    if args.pooling or is_sentence_transformers_folder(resolve_model_dir(args.model)):
        result = _sentence_embeddings(args)
    else:
        result = _token_embeddings(args)
    if args.json:
        print_json(result)
        return 0
    dimensions = plural(result["dimensions"], "dimension")
    if result["embeddings"] is not None:
        print(f"{plural(len(args.text), 'text')} x {dimensions} "
              f"({result['pooling']} pooling{', normalised' if result['normalized'] else ''})")
        for text, vector in zip(args.text, result["embeddings"]):
            print(f"{text[:40]!r:<44} {_first_values(vector)}")
        return 0
    for text, tokens, vectors in zip(args.text, result["tokens"], result["token_embeddings"]):
        which = f"{text[:40]!r}: " if len(args.text) > 1 else ""
        print(f"{which}{plural(len(tokens), 'token')} x {dimensions}")
        for token, vector in zip(tokens, vectors):
            print(f"{token!r:<16} {_first_values(vector)}")
    return 0


def _first_values(vector: list[float]) -> str:
    return "[" + " ".join(f"{v:+.4f}" for v in vector[:6]) + " ...]"


def _embedding_record(args: argparse.Namespace, dimensions: int, pooling: str | None = None,
                      normalized: bool = False, embeddings: list | None = None, tokens: list | None = None,
                      token_embeddings: list | None = None) -> dict[str, Any]:
    """What `embed --json` prints, with the same keys for sentence and per-token output."""
    return {"model": args.model, "texts": args.text,
            "output_value": "sentence_embedding" if embeddings is not None else "token_embeddings",
            "pooling": pooling, "normalized": normalized, "dimensions": dimensions, "embeddings": embeddings,
            "tokens": tokens, "token_embeddings": token_embeddings}


def _token_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    from distillery.pipelines import pipeline

    extractor = pipeline("feature-extraction", model=args.model, device=args.device, dtype=args.dtype)
    features = [f[0] for f in extractor(args.text, truncation=args.truncation or None)]  # per text (T, C)
    tokenizer = extractor.tokenizer
    tokens = [tokenizer.convert_ids_to_tokens(
        tokenizer([text], truncation=args.truncation, max_length=extractor.max_tokens)["input_ids"][0].tolist())
        for text in args.text]
    return _embedding_record(args, len(features[0][0]), tokens=tokens, token_embeddings=features)


def _sentence_embeddings(args: argparse.Namespace) -> dict[str, Any]:
    from distillery.models.sentence_encoder import PoolingConfig, load_sentence_encoder

    if args.dtype == "int8":
        raise DistilleryError("Sentence embeddings run in float32, bfloat16 or float16; leave --dtype int8 out.")
    encoder = load_sentence_encoder(args.model, device=args.device, dtype=args.dtype)
    if args.pooling:
        encoder.pooling = PoolingConfig(encoder.pooling.dimension, (args.pooling,))
    # Texts are cut at the encoder's max_seq_length, as sentence-transformers cuts them.
    embeddings = encoder.encode(args.text, batch_size=args.batch_size, normalize_embeddings=args.normalize)
    if not np.isfinite(embeddings).all():
        raise DistilleryError(f"The model at {args.model} gives non-finite embeddings; its weights are broken "
                              "(NaN or infinite values); re-save or re-download it.")
    return _embedding_record(args, embeddings.shape[1], pooling="+".join(encoder.pooling.modes),
                             normalized=encoder.normalize or args.normalize, embeddings=embeddings.tolist())


def info_command(args: argparse.Namespace) -> int:
    """Describe a checkpoint: family, task, size, shapes, stored dtype and its tokenizer.

    Reads config.json and the weight files' headers; the weights themselves are not loaded.
    """
    info = describe_checkpoint(args.model)
    if args.json:
        print_json(info)
        return 0
    tok = info["tokenizer"]
    rows = [
        ("model", info["model"]), ("path", info["path"]),
        ("family / task", f"{info['family']} / {info['task']} ({info['architecture']})"),
        ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)"),
        ("layers", info["layers"]), ("hidden size", info["hidden_size"]), ("heads", info["heads"]),
        ("vocabulary", info["vocab_size"]), ("positions", info["positions"]),
        ("stored dtype", info["dtype"]),
        ("weight files", f"{info['file_size_bytes'] / 2**20:.1f} MiB"),
        ("tokenizer", f"{tok['style']}, {tok['vocab_size']} tokens" if tok else "none in the folder"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def describe_checkpoint(name_or_path: str) -> dict[str, Any]:
    """What `distillery info` reports, as a dict; the parameter count comes from a model built on
    the meta device, so nothing is allocated."""
    import torch

    from distillery.models import checkpoint

    directory = checkpoint.resolve_model_dir(name_or_path)
    hf_config = checkpoint.read_config(directory)
    family, task = checkpoint.family_and_task(hf_config, directory / checkpoint.CONFIG_NAME, None)
    try:
        config = checkpoint.config_from_hf(family, hf_config)
    except (TypeError, ValueError) as e:
        raise DistilleryError(f"{directory / checkpoint.CONFIG_NAME}: {e}") from e
    with torch.device("meta"):
        model = checkpoint.build_model(config, task)
    weight_files = [f for f in sorted(directory.iterdir()) if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
    gpt2 = family == "gpt2"
    return {
        "model": str(name_or_path),
        "path": str(directory),
        "family": family,
        "task": task,
        "architecture": checkpoint.TASK_ARCHITECTURES[(family, task)],
        "parameters": model.num_parameters(),
        "layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "heads": config.n_head,
        "intermediate_size": config.mlp_width if gpt2 else config.intermediate_size,
        "vocab_size": config.vocab_size,
        "positions": config.n_positions if gpt2 else config.max_tokens,
        "dtype": stored_dtype(weight_files, hf_config),
        "file_size_bytes": sum(f.stat().st_size for f in weight_files),
        "tokenizer": _describe_tokenizer(directory),
    }


def stored_dtype(weight_files: list[Path], hf_config: dict[str, Any]) -> str:
    """The dtype(s) of the floating-point weights, from safetensors headers (else config.json)."""
    from safetensors import SafetensorError, safe_open

    dtypes = set()
    for file in weight_files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                dtypes.update(f.get_slice(k).get_dtype() for k in f.keys())  # noqa: SIM118 - not a dict
        except (SafetensorError, OSError) as e:
            raise DistilleryError(f"{file} is not a readable safetensors file ({e}); re-download or re-save it.") \
                from e
    floats = sorted({FLOAT_DTYPES[d] for d in dtypes if d in FLOAT_DTYPES})
    if floats:
        return "+".join(floats)
    return str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "unknown")


def _describe_tokenizer(directory: Path) -> dict[str, Any] | None:
    from distillery.tokenizer import load_tokenizer

    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json", "vocab.txt")):
        return None
    tokenizer = load_tokenizer(directory)
    return {"style": tokenizer.style, "vocab_size": tokenizer.vocab_size}
