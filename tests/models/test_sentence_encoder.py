"""Sentence embeddings equal sentence-transformers': every pooling mode, normalisation, truncation,
longest-first batching, the real all-MiniLM-L6-v2, and folders saved either way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import minilm_dir, save_tiny_sentence_encoder

from distillery.models.sentence_encoder import (
    POOLING_MODES,
    SentenceEncoderError,
    load_sentence_encoder,
    pool,
)

SENTENCES = ["A man is eating food.", "Hi", "Café naïve résumé 中文字符 🤗", "  spaced  out  ",
             "A much longer sentence that goes on and on, well past the twenty-four tokens this encoder keeps, "
             "so that it is cut the way sentence-transformers cuts it.", "The quick brown fox jumps over the lazy dog."]


def st_encode(directory, sentences, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(directory), device="cpu").encode(sentences, **kwargs)


@pytest.mark.parametrize("pooling", [*POOLING_MODES, ("cls", "mean"), ("max", "mean_sqrt_len_tokens")])
def test_every_pooling_equals_sentence_transformers(tmp_path, pooling):
    directory = save_tiny_sentence_encoder(tmp_path / "st", pooling=pooling, normalize=pooling == "mean")
    encoder = load_sentence_encoder(directory)
    ours = encoder.encode(SENTENCES, batch_size=4)
    theirs = st_encode(directory, SENTENCES, batch_size=4)
    assert ours.shape == theirs.shape == (len(SENTENCES), 32 * (1 if isinstance(pooling, str) else len(pooling)))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_normalize_embeddings_and_single_sentence(tmp_path):
    directory = save_tiny_sentence_encoder(tmp_path / "st", normalize=False)
    encoder = load_sentence_encoder(directory)
    assert not encoder.normalize
    ours = encoder.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, st_encode(directory, SENTENCES, normalize_embeddings=True), atol=1e-5)
    one = encoder.encode("A man is eating food.")
    assert one.shape == (32,)
    np.testing.assert_allclose(one, encoder.encode(["A man is eating food."])[0], atol=1e-6)
    assert encoder.encode([]).shape == (0, 32)


def test_batches_do_not_change_the_vectors_and_order_is_kept(tmp_path):
    encoder = load_sentence_encoder(save_tiny_sentence_encoder(tmp_path / "st"))
    alone = np.stack([encoder.encode([s])[0] for s in SENTENCES])
    np.testing.assert_allclose(encoder.encode(SENTENCES, batch_size=3), alone, atol=1e-5)


def test_truncation_at_max_seq_length(tmp_path):
    encoder = load_sentence_encoder(save_tiny_sentence_encoder(tmp_path / "st", max_seq_length=24))
    assert encoder.max_seq_length == 24
    assert encoder.tokenize(SENTENCES)["input_ids"].shape[1] == 24


def test_saved_folder_loads_in_sentence_transformers(tmp_path):
    encoder = load_sentence_encoder(save_tiny_sentence_encoder(tmp_path / "st", pooling=("cls", "mean")))
    encoder.save_pretrained(tmp_path / "ours")
    modules = json.loads((tmp_path / "ours" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    np.testing.assert_allclose(st_encode(tmp_path / "ours", SENTENCES), encoder.encode(SENTENCES), atol=1e-5)
    again = load_sentence_encoder(tmp_path / "ours")
    np.testing.assert_allclose(again.encode(SENTENCES), encoder.encode(SENTENCES), atol=1e-6)


def test_plain_encoder_gets_mean_pooling(tmp_path):
    directory = save_tiny_sentence_encoder(tmp_path / "st", normalize=False)
    plain = load_sentence_encoder(directory.with_name("st-bert"))
    assert plain.pooling.modes == ("mean",) and not plain.normalize
    assert plain.encode(SENTENCES[:2]).shape == (2, 32)


def test_forward_is_differentiable(tmp_path):
    encoder = load_sentence_encoder(save_tiny_sentence_encoder(tmp_path / "st"))
    batch = encoder.tokenize(SENTENCES[:3])
    out = encoder(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    out.embeddings.sum().backward()
    assert all(p.grad is not None for p in encoder.model.layers.parameters())
    assert len(out.hidden_states) == 3


def test_pool_ignores_padding():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(x, mask, ("mean",)), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(pool(x, mask, ("max",)), torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(pool(x, mask, ("cls", "lasttoken")), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(pool(x, mask, ("mean_sqrt_len_tokens",)), torch.tensor([[4.0, 6.0]]) / 2 ** 0.5)


def test_real_all_minilm_l6_v2_equals_sentence_transformers():
    directory = minilm_dir()
    encoder = load_sentence_encoder(directory)
    assert (encoder.dimension, encoder.max_seq_length, encoder.normalize) == (384, 256, True)
    sentences = SENTENCES + ["word " * 300]
    np.testing.assert_allclose(encoder.encode(sentences, batch_size=4), st_encode(directory, sentences, batch_size=4),
                               atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Bad folders: one sentence each


def _edit_json(path, change):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def test_unsupported_module_is_named(tmp_path):
    directory = save_tiny_sentence_encoder(tmp_path / "st")
    _edit_json(directory / "modules.json",
               lambda m: m + [{"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}])
    with pytest.raises(SentenceEncoderError, match="sentence_transformers.models.Dense"):
        load_sentence_encoder(directory)


def test_pooling_config_without_a_mode_is_refused(tmp_path):
    directory = save_tiny_sentence_encoder(tmp_path / "st")
    config = directory / "1_Pooling" / "config.json"
    _edit_json(config, lambda c: {k: (False if k.startswith("pooling_mode") else v) for k, v in c.items()
                                  if k != "pooling_mode"})
    with pytest.raises(SentenceEncoderError, match="sets no pooling mode"):
        load_sentence_encoder(directory)


def test_pooling_dimension_must_fit_the_encoder(tmp_path):
    directory = save_tiny_sentence_encoder(tmp_path / "st")
    _edit_json(directory / "1_Pooling" / "config.json",
               lambda c: {**c, "word_embedding_dimension": 31, "embedding_dimension": 31})
    with pytest.raises(SentenceEncoderError, match="hidden size is 32"):
        load_sentence_encoder(directory)


def test_causal_lm_is_not_a_sentence_encoder(tiny_gpt2_dir):
    from distillery.models import DistilleryError

    with pytest.raises(DistilleryError):
        load_sentence_encoder(tiny_gpt2_dir)


def test_embed_command_prints_sentence_embeddings(tmp_path, capsys):
    from distillery.cli import main

    directory = save_tiny_sentence_encoder(tmp_path / "st")
    assert main(["embed", str(directory), *SENTENCES[:3], "--json"]) == 0
    embeddings = np.array(json.loads(capsys.readouterr().out)["embeddings"])
    np.testing.assert_allclose(embeddings, st_encode(directory, SENTENCES[:3]), atol=1e-5)
    # A plain encoder keeps per-token features, unless --pooling asks for one vector per text.
    plain = directory.with_name("st-bert")
    assert main(["embed", str(plain), "A man is eating food.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_value"] == "token_embeddings"
    assert main(["embed", str(plain), *SENTENCES[:2], "--pooling", "max", "--json"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["embeddings"]).shape == (2, 32)
