"""The models a server answers for: each loaded once, under a name, with the task it serves.

    served = load_served_model("distilgpt2")                  # named "distilgpt2", text-generation
    served = load_served_model("student=runs/distil/model")   # named "student"

A GPT-2 checkpoint serves text-generation, a masked language model fill-mask, a
sentence-transformers folder (modules.json) or any other encoder feature-extraction. Requests
name a model; names are looked up among the served models only, never used as paths.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from distillery.models.common import DistilleryError
from distillery.serve.errors import ServeError

TASKS = ("text-generation", "fill-mask", "feature-extraction")
# NAME=PATH on the command line; a name is what clients send, so it keeps to URL-safe characters.
NAMED_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-/]*)=(?P<path>.+)$")


@dataclass
class ServedModel:
    """One model behind the server: its name, task and the pipeline (or sentence encoder) that runs it."""

    name: str
    task: str  # one of TASKS
    runner: Any  # TextGenerationPipeline, FillMaskPipeline, FeatureExtractionPipeline or SentenceEncoder
    source: str = ""  # the folder or hub id it was loaded from
    dtype: str = "float32"
    compile: bool = False
    draft: Any = None  # a draft model for speculative decoding (text-generation only)
    draft_k: int = 4
    chat_template: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens (left out of generated text)."""
        return frozenset(self.tokenizer.all_special_ids)

    @property
    def sentence_encoder(self) -> bool:
        """True for a sentence-transformers model (pooled embeddings, not per-token features)."""
        return hasattr(self.runner, "encode") and hasattr(self.runner, "pooling")

    @property
    def max_positions(self) -> int:
        """How many tokens one sequence may hold (prompt and generated tokens together)."""
        if self.sentence_encoder:
            return int(self.runner.max_seq_length)
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_tokens)

    @property
    def mask_token(self) -> str | None:
        return getattr(self.tokenizer, "mask_token", None) if self.task == "fill-mask" else None

    def describe(self) -> dict[str, Any]:
        """What a client (the playground page) needs to know of this model."""
        return {"name": self.name, "task": self.task, "mask_token": self.mask_token,
                "max_positions": self.max_positions, "dtype": self.dtype, "source": self.source,
                "speculative": self.draft is not None, "chat_template": self.chat_template is not None}


class ModelRegistry:
    """The served models by name, in the order given (the first is the default), and those still loading."""

    def __init__(self, models: list[ServedModel] | None = None) -> None:
        self.order: list[str] = []
        self.loaded: dict[str, ServedModel] = {}
        self.loading: dict[str, tuple[float, float]] = {}  # name -> (started, expected seconds)
        for served in models or []:
            self.add(served)

    def expect(self, name: str, expected_seconds: float) -> None:
        """Announce a model that is being loaded (requests for it get 503 with an estimated time)."""
        self._check_new(name)
        self.order.append(name)
        self.loading[name] = (time.monotonic(), expected_seconds)

    def add(self, served: ServedModel) -> None:
        if served.name not in self.loading:
            self._check_new(served.name)
            self.order.append(served.name)
        self.loading.pop(served.name, None)
        self.loaded[served.name] = served

    def _check_new(self, name: str) -> None:
        if name in self.loaded or name in self.loading:
            raise DistilleryError(f"Two served models are named {name!r}; give each its own name with NAME=PATH.")

    @property
    def ready(self) -> bool:
        return not self.loading

    def get(self, name: str, param: str = "model") -> ServedModel:
        """The served model called `name`; 404 for a name not served, 503 while it loads."""
        if name in self.loaded:
            return self.loaded[name]
        if name in self.loading:
            started, expected = self.loading[name]
            left = max(1.0, expected - (time.monotonic() - started))
            raise ServeError("loading", f"Model {name} is currently loading.", param=param, estimated_time=left)
        served = ", ".join(self.order) or "none"
        raise ServeError("not_found", f"Model {name!r} is not served here; served models: {served}.", param=param)

    def default(self, task: str | None = None) -> ServedModel:
        """The first served model (of `task`, if given)."""
        for name in self.order:
            if task is None or name in self.loading or self.loaded[name].task == task:
                return self.get(name)
        what = f"{task} model" if task else "model"
        raise ServeError("not_found", f"No {what} is served here; start the server with one.", param="model")

    def all(self) -> list[ServedModel]:
        return [self.loaded[name] for name in self.order if name in self.loaded]


def split_spec(spec: str) -> tuple[str, str]:
    """NAME=PATH -> (NAME, PATH); a bare PATH is named after its folder (or is its own hub id)."""
    match = NAMED_SPEC.match(spec)
    if match and not Path(spec).exists():
        return match["name"], match["path"]
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve().name, spec
    return spec, spec


def detect_task(source: str) -> str:
    """The task a checkpoint serves: text-generation for GPT-2, fill-mask for a masked LM, else
    feature-extraction (a sentence-transformers folder or a plain encoder)."""
    from distillery.models.checkpoint import read_config, resolve_model_dir

    directory = resolve_model_dir(source)
    if (directory / "modules.json").is_file():
        return "feature-extraction"
    config = read_config(directory)
    if config.get("model_type") == "gpt2":
        return "text-generation"
    if any(str(a).endswith("ForMaskedLM") for a in config.get("architectures") or []):
        return "fill-mask"
    return "feature-extraction"


def load_served_model(spec: str, dtype: str | None = None, device: str = "cpu", compile: bool = False,
                      draft: str | None = None, draft_dtype: str | None = None, draft_k: int = 4) -> ServedModel:
    """Load `spec` (PATH, hub id, or NAME=PATH) for serving, with its pipeline's settings.

    `compile` runs the decode steps through torch.compile; `draft` (a smaller model with the same
    tokenizer) makes the model decode speculatively, one request at a time.
    """
    from distillery.pipelines import pipeline

    name, source = split_spec(spec)
    task = detect_task(source)
    if task != "text-generation" and (compile or draft):
        flag = "--compile" if compile else "--draft"
        raise DistilleryError(f"{flag} applies to text-generation models, and {name} is a {task} model; "
                              f"leave {flag} out for it.")
    if task == "feature-extraction" and _is_sentence_folder(source):
        from distillery.models.sentence_encoder import load_sentence_encoder

        if dtype == "int8":
            raise DistilleryError(f"{name} is a sentence-transformers model, which runs in float32, bfloat16 or "
                                  "float16; leave --dtype int8 out (or serve it from another server).")
        runner = load_sentence_encoder(source, device=device, dtype=dtype)
    else:
        options = {"compile": True} if compile else {}
        runner = pipeline(task, model=source, device=device, dtype=dtype, **options)
    served = ServedModel(name=name, task=task, runner=runner, source=str(source), dtype=dtype or "float32",
                         compile=compile, chat_template=read_chat_template(source))
    if draft is not None:
        served.draft, served.draft_k = load_draft(draft, served, draft_dtype or dtype, device), draft_k
    return served


def _is_sentence_folder(source: str) -> bool:
    from distillery.models.checkpoint import resolve_model_dir

    return (resolve_model_dir(source) / "modules.json").is_file()


def load_draft(source: str, served: ServedModel, dtype: str | None, device: str) -> torch.nn.Module:
    """The draft model of a speculative pair, prepared as pipelines prepare models; its vocabulary
    must be the target's."""
    from distillery.generation.quantize import prepare_for_inference
    from distillery.models.checkpoint import load_model

    draft = load_model(source, device=device, dtype=None if dtype == "int8" else dtype)
    if getattr(draft, "family", None) != "gpt2":
        raise DistilleryError(f"--draft {source} is not a GPT-2 family model; a draft must generate text.")
    if draft.config.vocab_size != served.model.config.vocab_size:
        raise DistilleryError(f"--draft {source} has a vocabulary of {draft.config.vocab_size} tokens but "
                              f"{served.name} has {served.model.config.vocab_size}; a draft needs the same tokenizer.")
    return prepare_for_inference(draft, int8=dtype == "int8")


def read_chat_template(source: str) -> str | None:
    """The checkpoint's chat template (tokenizer_config.json's chat_template, or chat_template.jinja), if any."""
    import json

    from distillery.models.checkpoint import resolve_model_dir

    directory = resolve_model_dir(source)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        try:
            template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None  # the tokenizer loader reports a broken file in its own words
        return template if isinstance(template, str) else None
    return None


def expected_load_seconds(source: str) -> float:
    """A guess at how long loading takes, for the 503's estimated_time: the weights at 200 MB/s."""
    from distillery.models.checkpoint import resolve_model_dir

    try:
        directory = resolve_model_dir(source)
    except DistilleryError:
        return 1.0
    size = sum(f.stat().st_size for f in directory.glob("*") if f.suffix in (".safetensors", ".bin"))
    return max(1.0, size / 200e6)
