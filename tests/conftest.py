"""Shared fixtures: the ../shared/data folder and tiny random checkpoints saved by transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $DISTILLERY_SHARED_DATA); tests that need it skip where it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set DISTILLERY_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    # Nothing in the tests may reach the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tiny_gpt2(directory: Path, vocab_size: int = 99, seed: int = 0, **overrides) -> Path:
    """A tiny random GPT-2 (transformers' GPT2LMHeadModel) saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    kwargs.update(overrides)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    model.save_pretrained(directory)
    return Path(directory)


def save_tiny_roberta(directory: Path, cls_name: str = "RobertaForMaskedLM", vocab_size: int = 99,
                      seed: int = 0, **overrides) -> Path:
    """A tiny random RoBERTa of the given transformers class, saved with save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=66)
    kwargs.update(overrides)
    model = getattr(transformers, cls_name)(transformers.RobertaConfig(**kwargs)).eval()
    model.save_pretrained(directory)
    return Path(directory)


def copy_vocab(shared_data: Path, style: str, directory: Path) -> Path:
    """Put the real GPT-2 or RoBERTa vocab.json + merges.txt next to a tiny model; return the folder."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(shared_data / "tokenizers" / style / name, Path(directory) / name)
    return Path(directory)


@pytest.fixture(scope="session")
def real_vocab_models(tmp_path_factory, shared_data) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny RoBERTa masked LM with the real vocabularies and their tokenizer files."""
    root = tmp_path_factory.mktemp("real-vocab")
    gpt2 = save_tiny_gpt2(root / "gpt2", vocab_size=50257, n_embd=16, n_head=2)
    roberta = save_tiny_roberta(root / "roberta", vocab_size=50265, hidden_size=16, num_attention_heads=2)
    for model_dir, vocab in ((gpt2, "gpt2"), (roberta, "roberta")):
        copy_vocab(shared_data, vocab, model_dir)
    return {"gpt2": gpt2, "roberta": roberta}


@pytest.fixture
def tiny_gpt2_dir(tmp_path) -> Path:
    return save_tiny_gpt2(tmp_path / "tiny-gpt2")


@pytest.fixture
def tiny_roberta_dir(tmp_path) -> Path:
    return save_tiny_roberta(tmp_path / "tiny-roberta")
