"""Pipelines with transformers' names, arguments and output shapes.

    >>> from distillery.pipelines import pipeline, set_seed
    >>> generator = pipeline("text-generation", model="distilgpt2")
    >>> set_seed(42)
    >>> generator("Hello, I’m a language model", max_length=20, num_return_sequences=5)
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from distillery.models.common import DistilleryError, Pretrained

TASKS = ("text-generation", "fill-mask", "feature-extraction")

__all__ = ["TASKS", "pipeline", "set_seed"]


def set_seed(seed: int) -> None:
    """Seed Python's `random`, numpy and torch (every device), as transformers.set_seed does."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DistilleryError(f"set_seed takes an integer seed, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA devices too


def pipeline(
    task: str,
    model: str | os.PathLike | Pretrained,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    **kwargs: Any,
):
    """Build the pipeline for `task` ("text-generation", "fill-mask" or "feature-extraction").

    `model` is a local folder or hub id (the tokenizer is then read from the same place unless
    `tokenizer` names another), or a loaded distillery model together with its `tokenizer` (a
    Tokenizer or a folder). `dtype`: "float32" (default), "bfloat16", "float16", or "int8"
    (int8 weights with per-output-channel scales, activations quantised per call; CPU only).
    Extra keyword arguments go to the pipeline's constructor (for text-generation: generation
    settings that apply to every call).
    """
    from distillery.models.checkpoint import load_model, read_config, resolve_dtype, resolve_model_dir

    if task not in TASKS:
        raise DistilleryError(f"Unknown pipeline task {task!r}; choose one of {list(TASKS)}.")
    # int8 quantises a float model after loading.
    quantize = dtype == "int8"
    if quantize:
        dtype = None
    directory = None
    if isinstance(model, Pretrained):
        if tokenizer is None:
            raise DistilleryError("pipeline() got a loaded model but no tokenizer; pass tokenizer=... as well.")
        model = model.to(device)
        if dtype is not None:
            model = model.to(resolve_dtype(dtype))
    else:
        directory = resolve_model_dir(model)
        head = None
        if task == "fill-mask" and read_config(directory).get("model_type") != "gpt2":
            head = "masked-lm"  # as transformers loads AutoModelForMaskedLM
        model = load_model(directory, task=head, dtype=dtype, device=device)
        if head is not None:
            _check_masked_lm_head(model, directory)
        tokenizer = tokenizer if tokenizer is not None else directory
    # Few-row products (decoding, short texts) run faster on a CPU with prepacked weights; the
    # layout changes only for models loaded here, which nobody else holds. With compile=True the
    # float layers stay nn.Linear: torch.compile then lays the weights out for its own kernels.
    if quantize or (directory is not None and not kwargs.get("compile")):
        from distillery.generation.quantize import prepare_for_inference

        model = prepare_for_inference(model, int8=quantize)
    if not hasattr(tokenizer, "decode"):
        from distillery.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)

    if task == "text-generation":
        from distillery.pipelines.text_generation import (
            TextGenerationPipeline,
            checkpoint_generation_defaults,
        )

        defaults = checkpoint_generation_defaults(model, directory)
        return TextGenerationPipeline(model, tokenizer, generation_defaults=defaults, **kwargs)
    if task == "fill-mask":
        from distillery.pipelines.fill_mask import FillMaskPipeline

        return FillMaskPipeline(model, tokenizer, **kwargs)
    from distillery.pipelines.feature_extraction import FeatureExtractionPipeline

    return FeatureExtractionPipeline(model, tokenizer, **kwargs)


def _check_masked_lm_head(model: Pretrained, directory) -> None:
    """Refuse an encoder checkpoint whose masked-LM head was made up at load time (a classifier, a
    bare encoder): transformers would predict with random weights; we say so instead."""
    from distillery.models.checkpoint import CONFIG_NAME, family_and_task, read_config

    fresh = [k for k in getattr(model, "newly_initialized", []) if k.startswith("lm_")]
    if fresh:
        _, stored = family_and_task(read_config(directory), directory / CONFIG_NAME, None)
        raise DistilleryError(
            f"{directory} holds a {model.family} {stored} model without a masked-LM head, so it cannot fill "
            "masks; use fill-mask with a masked-LM checkpoint (…ForMaskedLM) or feature-extraction with this one."
        )
