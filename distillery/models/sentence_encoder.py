"""Sentence embeddings as sentence-transformers makes them: an encoder, a pooling, a normalisation.

A sentence-transformers folder is a list of modules (`modules.json`), each with its own small
config: the Transformer (the encoder's checkpoint at the folder's root, `sentence_bert_config.json`
with `max_seq_length` and `do_lower_case`), the Pooling (`1_Pooling/config.json`) and, optionally,
Normalize (no config). `SentenceEncoder` holds the three as plain attributes; its `forward` is
differentiable (distillation trains through it) and `encode` is the inference call, batching
sentences longest first as sentence-transformers does so that the same sentences share a batch and
their padding, then restoring the caller's order.

    >>> encoder = load_sentence_encoder("sentence-transformers/all-MiniLM-L6-v2")
    >>> encoder.encode(["A man is eating food.", "A man is eating pasta."]).shape
    (2, 384)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distillery.models.common import DistilleryError, Pretrained, read_json_object

MODULES_FILE = "modules.json"
SENTENCE_CONFIG_FILE = "sentence_bert_config.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"

# Pooling modes, in the order sentence-transformers concatenates them when several are on, with
# the boolean keys its older configs use for each.
POOLING_MODES = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
MODULE_KINDS = ("Transformer", "Pooling", "Normalize")


class SentenceEncoderError(DistilleryError):
    """A sentence-transformers folder or argument that cannot be used."""


# ----------------------------------------------------------------------------------------------
# Pooling: (B, T, C) token embeddings and a (B, T) mask -> (B, modes * C)


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Concatenate one (B, C) vector per mode, with pads ignored:

        mean = sum_t m_t x_t / max(sum_t m_t, 1e-9)      mean_sqrt_len_tokens = sum_t m_t x_t / sqrt(sum_t m_t)
        max  = max over real tokens                       cls = the first real token
        weightedmean: token t weighted by its position (1, 2, ... from the first real token)
        lasttoken: the last real token
    """
    mask = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)  # (B, T, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            first = attention_mask.int().argmax(dim=1)
            out.append(token_embeddings[torch.arange(len(first)), first])
        elif mode == "max":
            out.append(token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (token_embeddings * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            start = attention_mask.int().argmax(dim=1, keepdim=True)  # left padding shifts the weights
            positions = torch.arange(1, mask.size(1) + 1, device=mask.device, dtype=mask.dtype)
            weights = mask * (positions[None] - start).unsqueeze(-1)
            out.append((token_embeddings * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = mask.size(1) - 1 - attention_mask.flip(1).int().argmax(dim=1)
            out.append(token_embeddings[torch.arange(len(last)), last])
        else:
            raise AssertionError(mode)
    return torch.cat(out, dim=-1)


@dataclass
class PoolingConfig:
    """`1_Pooling/config.json`: the token dimension and the modes to concatenate."""

    dimension: int
    modes: tuple[str, ...] = ("mean",)

    @classmethod
    def read(cls, file: Path) -> PoolingConfig:
        config = _read_json_object(file)
        dimension = config.get("word_embedding_dimension", config.get("embedding_dimension"))
        if "pooling_mode" in config:  # newer layout: one name or a list of names
            given = config["pooling_mode"]
            modes = (given,) if isinstance(given, str) else tuple(given or ())
        else:
            modes = tuple(mode for mode, key in POOLING_MODES.items() if config.get(key))
        unknown = [m for m in modes if m not in POOLING_MODES]
        if unknown:
            raise SentenceEncoderError(f"{file}: pooling mode {unknown[0]!r} is not supported; use one of "
                                       f"{list(POOLING_MODES)}.")
        if not modes:
            raise SentenceEncoderError(f"{file} sets no pooling mode; set one of {list(POOLING_MODES.values())} "
                                       "to true (mean pooling is the usual choice).")
        if not isinstance(dimension, int) or dimension <= 0:
            raise SentenceEncoderError(f"{file}: word_embedding_dimension must be a positive integer, got "
                                       f"{dimension!r}.")
        return cls(dimension, modes)

    def to_json(self) -> dict[str, Any]:
        # The boolean keys every sentence-transformers version reads.
        return {"word_embedding_dimension": self.dimension,
                **{key: mode in self.modes for mode, key in POOLING_MODES.items()}, "include_prompt": True}


# ----------------------------------------------------------------------------------------------
# The encoder


@dataclass
class SentenceOutput:
    embeddings: torch.Tensor  # (B, D) pooled, normalised if the encoder normalises
    token_embeddings: torch.Tensor  # (B, T, C)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embedding output, then one per layer


class SentenceEncoder(nn.Module):
    """An encoder, its pooling and optional L2 normalisation; `encode` returns NumPy arrays."""

    def __init__(self, model: Pretrained, tokenizer, pooling: PoolingConfig, normalize: bool = False,
                 max_seq_length: int | None = None, do_lower_case: bool = False) -> None:
        super().__init__()
        if model.task != "base" or getattr(model, "family", None) == "gpt2":
            raise SentenceEncoderError(f"A sentence encoder needs a bare encoder (BERT, DistilBERT or RoBERTa "
                                       f"base model), not a {model.family} {model.task} model.")
        hidden = _hidden_size(model)
        if pooling.dimension != hidden:
            raise SentenceEncoderError(f"The pooling config says word_embedding_dimension {pooling.dimension} but "
                                       f"the encoder's hidden size is {hidden}; fix {POOLING_DIR}/config.json.")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        limit = model.config.max_tokens
        # Never past the model's positions (tokenizers often say 1e30 for "no limit").
        self.max_seq_length = min(max_seq_length or limit, limit)
        self.do_lower_case = do_lower_case

    @property
    def dimension(self) -> int:
        return self.pooling.dimension * len(self.pooling.modes)

    def get_sentence_embedding_dimension(self) -> int:
        """The embeddings' width (sentence-transformers' name for it)."""
        return self.dimension

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Padded (B, T) `input_ids` and `attention_mask`, cut at `max_seq_length` tokens."""
        if self.do_lower_case:
            sentences = [s.lower() for s in sentences]
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_seq_length)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                output_hidden_states: bool = False) -> SentenceOutput:
        out = self.model(input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        embeddings = pool(out.last_hidden_state, attention_mask, self.pooling.modes)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=1)
        return SentenceOutput(embeddings, out.last_hidden_state, out.hidden_states)

    @torch.inference_mode()
    def encode(self, sentences: str | list[str], batch_size: int = 32, normalize_embeddings: bool = False,
               convert_to_numpy: bool = True, show_progress_bar: bool = False) -> np.ndarray | torch.Tensor:
        """(N, D) float32 embeddings of N sentences ((D,) for one str), in the order given."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if not all(isinstance(t, str) for t in texts):
            raise SentenceEncoderError("encode takes a sentence or a list of sentences (str).")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise SentenceEncoderError(f"batch_size must be a positive integer, got {batch_size!r}.")
        was_training = self.training
        self.eval()
        # Longest first (sentence-transformers' order, by characters), so batches match its padding.
        order = np.argsort([-len(t) for t in texts])
        chunks = []
        starts = range(0, len(texts), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches", unit="batch")
        for start in starts:
            batch = self.tokenize([texts[i] for i in order[start:start + batch_size]])
            out = self(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            embeddings = out.embeddings.float()
            if normalize_embeddings:
                embeddings = F.normalize(embeddings, p=2, dim=1)
            chunks.append(embeddings.cpu())
        self.train(was_training)
        stacked = torch.cat(chunks) if chunks else torch.empty(0, self.dimension)
        embeddings = stacked[torch.from_numpy(np.argsort(order))] if len(texts) else stacked
        if single:
            embeddings = embeddings[0]
        return embeddings.numpy() if convert_to_numpy else embeddings

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a folder sentence-transformers (and distillery) load: the encoder and tokenizer at
        the root, modules.json, the pooling config, and Normalize when on."""
        from distillery.models.checkpoint import write_json

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"}]
        (out / POOLING_DIR).mkdir(exist_ok=True)
        write_json(out / POOLING_DIR / "config.json", self.pooling.to_json())
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": NORMALIZE_DIR,
                            "type": "sentence_transformers.models.Normalize"})
            (out / NORMALIZE_DIR).mkdir(exist_ok=True)
        elif (out / NORMALIZE_DIR).is_dir():
            shutil.rmtree(out / NORMALIZE_DIR)
        write_json(out / SENTENCE_CONFIG_FILE, {"max_seq_length": self.max_seq_length,
                                                "do_lower_case": self.do_lower_case})
        write_json(out / MODULES_FILE, modules)

    save = save_pretrained


def _hidden_size(model: Pretrained) -> int:
    config = model.config
    for name in ("hidden_size", "dim", "n_embd"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise AssertionError(f"no hidden size on {type(config).__name__}")


def _read_json_object(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise SentenceEncoderError(f"{file} is missing; a sentence-transformers folder needs it.")
    return read_json_object(file, SentenceEncoderError)


# ----------------------------------------------------------------------------------------------
# Loading


def is_sentence_transformers_folder(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MODULES_FILE).is_file()


def read_modules(directory: Path) -> list[dict[str, Any]]:
    """modules.json's entries, each with a supported `kind` (Transformer, Pooling, Normalize)."""
    file = directory / MODULES_FILE
    try:
        modules = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SentenceEncoderError(f"{file} is not valid JSON ({e}); fix or re-download it.") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                 for m in modules):
        raise SentenceEncoderError(f"{file} must be a list of modules, each with a 'type'.")
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind not in MODULE_KINDS:
            raise SentenceEncoderError(f"{file} names the module {module['type']!r}, which distillery does not "
                                       f"support; it runs {', '.join(MODULE_KINDS)} only.")
        module["kind"] = kind
    kinds = [m["kind"] for m in modules]
    if kinds[:1] != ["Transformer"] or kinds.count("Transformer") != 1 or "Pooling" not in kinds:
        raise SentenceEncoderError(f"{file} must list a Transformer first and then a Pooling module "
                                   f"(it lists {kinds}).")
    return modules


def load_sentence_encoder(name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None) -> SentenceEncoder:
    """A sentence-transformers folder or hub id (from the Hugging Face cache) as a SentenceEncoder.

    A plain encoder checkpoint without modules.json gets mean pooling, as sentence-transformers
    gives one.
    """
    from distillery.models.checkpoint import FAMILY_TASKS, load_model, read_config, resolve_model_dir
    from distillery.tokenizer import load_tokenizer

    directory = resolve_model_dir(name_or_path)
    if is_sentence_transformers_folder(directory):
        modules = read_modules(directory)
        transformer_dir = directory / modules[0].get("path", "")
        pooling_module = next(m for m in modules if m["kind"] == "Pooling")
        pooling = PoolingConfig.read(directory / pooling_module.get("path", POOLING_DIR) / "config.json")
        normalize = any(m["kind"] == "Normalize" for m in modules)
        settings_file = transformer_dir / SENTENCE_CONFIG_FILE
        settings = _read_json_object(settings_file) if settings_file.is_file() else {}
    else:
        transformer_dir, pooling, normalize, settings = directory, None, False, {}
    model_type = read_config(transformer_dir).get("model_type")
    if "base" not in FAMILY_TASKS.get(model_type, ["base"]):  # an unknown type is named by load_model
        raise SentenceEncoderError(f"{name_or_path} is a {model_type} language model; sentence embeddings need an "
                                   "encoder: a BERT, DistilBERT or RoBERTa folder, or a sentence-transformers one.")
    model = load_model(transformer_dir, task="base", device=device, dtype=dtype)
    if pooling is None:
        pooling = PoolingConfig(_hidden_size(model), ("mean",))
    max_seq_length = settings.get("max_seq_length")
    if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
        raise SentenceEncoderError(f"{settings_file}: max_seq_length must be a positive integer, got "
                                   f"{max_seq_length!r}.")
    tokenizer = load_tokenizer(transformer_dir)
    if max_seq_length is None:  # newer sentence-transformers keep it as the tokenizer's model_max_length
        max_seq_length = tokenizer.model_max_length
    return SentenceEncoder(model.eval(), tokenizer, pooling, normalize, max_seq_length,
                           bool(settings.get("do_lower_case", False)))
