"""The "text-generation" pipeline: prompts in, `[{"generated_text": ...}]` out, as transformers'.

    >>> generator = pipeline("text-generation", model="distilgpt2")
    >>> set_seed(42)
    >>> generator("Hello, I’m a language model", max_length=20, num_return_sequences=5)

Behaviour copied from transformers 5.23, so that the same weights and seed give the same tokens:
- Defaults: the checkpoint's generation settings (generation_config.json, or generation keys in
  config.json), then the pipeline's own — max_new_tokens=256, do_sample=True, temperature=0.7 —
  for what neither the call nor the checkpoint sets (max_new_tokens not when max_length is given;
  the sampling ones only when sampling). config.json's `task_specific_params` are not read, as
  transformers 5 no longer reads them.
- Without a pad token (GPT-2) finished rows are padded with the EOS id.
- Each prompt of a list is generated on its own, in order (transformers' default batch size of 1),
  so a seeded run draws the same random numbers; `batch_size=N` batches them with left padding.
- Output text: the prompt string followed by the decoded new tokens (special tokens skipped, no
  clean-up of spaces), or only the new text with return_full_text=False.
Added here: `stop` strings (the text is cut just before the first one), `truncation=True` to keep
the end of a prompt too long for the model, and `stream(prompt)` yielding text pieces.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distillery.generation.config import GenerationConfig
from distillery.generation.engine import check_step_options, generate, stream
from distillery.models.common import DistilleryError, Pretrained

logger = logging.getLogger(__name__)

GENERATION_ARGS = ("max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                   "repetition_penalty", "num_return_sequences")
# transformers' TextGenerationPipeline defaults, used for what neither call nor checkpoint sets.
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_ARGS = ("temperature", "top_k", "top_p")

Record = dict[str, str]


def checkpoint_generation_defaults(model: Pretrained, directory: str | Path | None = None) -> dict[str, Any]:
    """The generation settings a checkpoint carries: generation keys left in config.json (kept in
    `model.config.extra`), overridden by `directory`/generation_config.json when there is one."""
    keys = (*GENERATION_ARGS, "eos_token_id", "pad_token_id")
    extra = getattr(model.config, "extra", {})
    defaults = {k: v for k, v in extra.items() if k in keys and v is not None}
    # The checkpoint's own text-generation settings (distilgpt2: do_sample=True, max_length=50).
    # transformers 4.x applied them, which is how the model cards' samples were made; 5.x ignores them.
    task_params = (extra.get("task_specific_params") or {}).get("text-generation") or {}
    defaults.update({k: v for k, v in task_params.items() if k in keys and v is not None})
    file = Path(directory) / "generation_config.json" if directory is not None else None
    if file is not None and file.is_file():
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DistilleryError(f"{file} is not valid JSON ({e}); fix or delete it.") from e
        if not isinstance(stored, dict):
            raise DistilleryError(f"{file} must hold a JSON object of settings, not a {type(stored).__name__}; "
                                  "fix or delete it.")
        stored = {k: v for k, v in stored.items() if k in keys and v is not None}
        _check_stored_settings(stored, file)
        defaults.update(stored)
    return defaults


def _check_stored_settings(stored: dict[str, Any], file: Path) -> None:
    """Each setting of a generation_config.json checked alone (with sampling on, so that settings
    meant for sampling pass), so that a bad value names the file it came from."""
    from distillery.models.common import ConfigError

    for key, value in stored.items():
        try:
            GenerationConfig(**{"do_sample": True, key: value})
        except (ConfigError, TypeError) as e:
            raise DistilleryError(f"{file}: {e} Fix or delete the file.") from e


class TextGenerationPipeline:
    """Continue one prompt or a list of prompts with a GPT-2 family model."""

    def __init__(self, model: Pretrained, tokenizer, generation_defaults: dict[str, Any] | None = None,
                 compile: bool = False, cuda_graphs: bool = False, **generate_kwargs: Any) -> None:
        """`generation_defaults`: the checkpoint's settings (see `checkpoint_generation_defaults`);
        `compile`: decode steps through torch.compile (engine.compiled_decode_step; pipeline() then keeps
        the float layers as nn.Linear for it);
        `cuda_graphs`: decode steps replayed as a CUDA graph (engine.FixedShapeDecodeStep; CUDA only);
        `generate_kwargs` (max_new_tokens=..., ...) apply to every call unless the call overrides them."""
        if not hasattr(model, "new_cache"):
            raise DistilleryError(
                f"text-generation needs a causal language model (GPT-2 family), but this is a {model.family} "
                f"{model.task} model; use fill-mask or feature-extraction for it."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation_defaults = {**checkpoint_generation_defaults(model), **(generation_defaults or {})}
        _check_generation_args(generate_kwargs)
        self.generate_kwargs = generate_kwargs
        check_step_options(model, compile, cuda_graphs)  # now, not at the first call
        self.compile = compile
        self.cuda_graphs = cuda_graphs

    def __call__(
        self,
        text_inputs: str | list[str],
        *,
        return_full_text: bool = True,
        stop: str | list[str] | None = None,
        truncation: bool = False,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        batch_size: int = 1,
        **generate_kwargs: Any,
    ) -> list[Record] | list[list[Record]]:
        """Generate for a prompt (-> list of records) or a list of prompts (-> list of lists).

        generate_kwargs: max_length, max_new_tokens, num_return_sequences, do_sample, temperature,
        top_k, top_p, repetition_penalty. Each record is {"generated_text": str}.
        batch_size > 1 generates that many prompts at once, left-padded: greedy output is the same,
        but sampling draws its random numbers in another order than prompt by prompt (and
        max_length counts the padded length, as in transformers).
        """
        prompts = _prompts(text_inputs)
        config = self.generation_config(**generate_kwargs)
        stops = _stop_strings(stop)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DistilleryError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(text_inputs, str):
            # transformers runs a list through a torch DataLoader, whose iterator draws one int64
            # (its workers' base seed) from the global generator first; draw it too, so that a
            # seeded run samples the same tokens.
            torch.empty((), dtype=torch.int64).random_()
        n = config.num_return_sequences
        results = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = self._encode_batch(chunk, config, truncation)
            checker = StopStrings(self.tokenizer, stops, len(chunk) * n) if stops else None
            tokens = generate(self.model, ids, mask, config, stop=checker, compile=self.compile,
                              cuda_graphs=self.cuda_graphs)
            tokens = tokens[:, ids.size(1) :].tolist()
            for i, prompt in enumerate(chunk):
                records = []
                for row in tokens[i * n : (i + 1) * n]:
                    text = self.tokenizer.decode(row, skip_special_tokens=skip_special_tokens,
                                                 clean_up_tokenization_spaces=clean_up_tokenization_spaces)
                    text = cut_at_stop(text, stops)
                    records.append({"generated_text": prompt + text if return_full_text else text})
                results.append(records)
        return results[0] if isinstance(text_inputs, str) else results

    def stream(self, prompt: str, *, stop: str | list[str] | None = None, truncation: bool = False,
               **generate_kwargs: Any) -> Iterator[str]:
        """Yield the new text piece by piece as tokens arrive (never half a character); the pieces
        join to the `generated_text` that `__call__` with return_full_text=False gives."""
        config = self.generation_config(**generate_kwargs)
        if config.num_return_sequences != 1:
            raise DistilleryError("stream() generates one sequence; leave num_return_sequences at 1.")
        stops = _stop_strings(stop)
        ids = self._encode(_prompts(prompt)[0], config, truncation)
        decoder = self.tokenizer.incremental_decoder(skip_special_tokens=True)
        eos = set(config.eos_token_ids)
        pending = ""  # decoded text not yet yielded: it may be the start of a stop string
        for token in stream(self.model, ids, None, config, compile=self.compile, cuda_graphs=self.cuda_graphs):
            token_id = int(token[0])
            if token_id in eos:
                break
            pending += decoder.add(token_id)
            cut = cut_at_stop(pending, stops)
            if len(cut) < len(pending):
                if cut:
                    yield cut
                return
            safe = len(pending) - stop_prefix_length(pending, stops)
            if safe:
                yield pending[:safe]
                pending = pending[safe:]
        rest = cut_at_stop(pending + decoder.flush(), stops)
        if rest:
            yield rest

    def generation_config(self, **generate_kwargs: Any) -> GenerationConfig:
        """The settings of a call: its arguments, over those given at construction, over the
        checkpoint's, over the pipeline's defaults (transformers' precedence)."""
        _check_generation_args(generate_kwargs)
        call = {**self.generate_kwargs, **generate_kwargs}
        call = {k: v for k, v in call.items() if v is not None}
        chosen = {**self.generation_defaults, **call}
        # transformers 5's pipeline defaults stand in only when the checkpoint says nothing itself.
        configured = any(k in self.generation_defaults for k in GENERATION_ARGS)
        added = {} if configured else {
            k: v for k, v in PIPELINE_DEFAULTS.items()
            if k not in chosen and not (k == "max_new_tokens" and "max_length" in chosen)}
        if not {**chosen, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_ARGS}
        settings = {**chosen, **added}
        if settings.get("eos_token_id") is None:
            # transformers takes EOS from the model's config; the tokenizer's is the fallback.
            model_eos = getattr(self.model.config, "eos_token_id", None)
            settings["eos_token_id"] = model_eos if model_eos is not None else self.tokenizer.eos_token_id
        if settings.get("pad_token_id") is None:
            settings["pad_token_id"] = self.tokenizer.pad_token_id
        if settings["pad_token_id"] is None and settings["eos_token_id"] is not None:
            eos = settings["eos_token_id"]
            settings["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
            logger.info("Setting `pad_token_id` to `eos_token_id`:%s for open-end generation.",
                        settings["pad_token_id"])
        return GenerationConfig(**settings)

    def _encode_batch(self, prompts: list[str], config: GenerationConfig,
                      truncation: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) left-padded prompt ids and their attention mask (None for a single prompt)."""
        rows = [self._encode(prompt, config, truncation)[0].tolist() for prompt in prompts]
        if len(rows) == 1:
            return torch.tensor(rows), None
        width = max(map(len, rows))
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def _encode(self, prompt: str, config: GenerationConfig, truncation: bool) -> torch.Tensor:
        """(1, T) prompt ids. An empty prompt starts from the BOS token, as transformers does."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise DistilleryError("The prompt is empty and the tokenizer has no BOS token to start from; "
                                      "pass some text.")
            ids = [self.tokenizer.bos_token_id]
        positions = self.model.config.n_positions
        if truncation:
            keep = self._prompt_room(config, positions)
            ids = ids[-keep:]
        elif len(ids) > positions:
            raise DistilleryError(
                f"The prompt is {len(ids)} tokens long but the model has only {positions} positions; shorten it "
                "or pass truncation=True (--truncation on the command line) to keep its end."
            )
        return torch.tensor([ids], dtype=torch.long)

    @staticmethod
    def _prompt_room(config: GenerationConfig, positions: int) -> int:
        """How many prompt tokens fit when truncating: all positions but those the new tokens need."""
        if config.max_new_tokens is not None:
            room = positions - config.max_new_tokens
        elif config.max_length is not None:
            room = min(config.max_length, positions) - 1
        else:
            room = positions - config.new_tokens_for(0)
        if room < 1:
            raise DistilleryError(
                f"truncation=True cannot make room: the model has {positions} positions and "
                f"{positions - room} are asked for new tokens; lower max_new_tokens / max_length."
            )
        return room


class StopStrings:
    """Ends a row once its generated text contains one of the stop strings (checked per token)."""

    def __init__(self, tokenizer, stops: list[str], rows: int) -> None:
        self.stops = stops
        self.decoders = [tokenizer.incremental_decoder(skip_special_tokens=True) for _ in range(rows)]
        self.texts = [""] * rows
        self.done = [False] * rows

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, token_id in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            before = len(self.texts[row])
            self.texts[row] += self.decoders[row].add(token_id)
            # Only the tail can hold a new occurrence: the new text and what a stop may straddle.
            start = max(0, before - max(len(s) for s in self.stops) + 1)
            tail = self.texts[row][start:]
            self.done[row] = any(s in tail for s in self.stops)
        return torch.tensor(self.done, device=tokens.device)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (must be held back when
    streaming, since the next token may complete the stop string)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _prompts(text_inputs: Any) -> list[str]:
    if isinstance(text_inputs, str):
        return [text_inputs]
    if isinstance(text_inputs, (list, tuple)) and all(isinstance(t, str) for t in text_inputs):
        return list(text_inputs)
    raise DistilleryError(
        f"text-generation takes a prompt string or a list of strings, got {type(text_inputs).__name__}."
    )


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise DistilleryError(f"stop must be a non-empty string or a list of them, got {stop!r}.")
    return stops


def _check_generation_args(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(GENERATION_ARGS))
    if unknown:
        raise DistilleryError(
            f"text-generation got unknown argument(s) {unknown}; it takes {list(GENERATION_ARGS)}, "
            "return_full_text, stop, truncation, skip_special_tokens and clean_up_tokenization_spaces."
        )
