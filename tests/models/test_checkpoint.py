"""The checkpoint boundary: every layout transformers writes loads, every bad file is named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import save_tiny_gpt2, save_tiny_roberta
from safetensors.torch import load_file, save_file

from distillery.models import DistilleryError, load_model
from distillery.models.checkpoint import resolve_model_dir

IDS = torch.tensor([[5, 17, 42, 8, 91, 3, 60]])


def gpt2_logits_hf(directory, ids=IDS):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits


def roberta_logits_hf(directory, ids=IDS):
    import transformers

    model = transformers.RobertaForMaskedLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits


def ours_logits(directory, ids=IDS, **kwargs):
    with torch.no_grad():
        return load_model(directory, **kwargs)(ids).logits


def rewrite_safetensors(directory, edit) -> None:
    """Apply `edit` to the state dict in directory/model.safetensors and save it back."""
    file = directory / "model.safetensors"
    state = load_file(str(file))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence naming the file or tensor


def test_missing_config_json(tiny_gpt2_dir):
    (tiny_gpt2_dir / "config.json").unlink()
    with pytest.raises(DistilleryError, match=r"has no config\.json; a model folder needs one"):
        load_model(tiny_gpt2_dir)


def test_unknown_model_type(tiny_gpt2_dir):
    config = json.loads((tiny_gpt2_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (tiny_gpt2_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DistilleryError, match=r"model_type 'llama' is not supported; distillery runs \['bert', "
                                              r"'distilbert', 'gpt2', 'roberta'\]"):
        load_model(tiny_gpt2_dir)


def test_config_json_not_json(tiny_gpt2_dir):
    (tiny_gpt2_dir / "config.json").write_text("{not json")
    with pytest.raises(DistilleryError, match=r"config\.json is not valid JSON"):
        load_model(tiny_gpt2_dir)


def test_misshaped_tensor(tiny_gpt2_dir):
    rewrite_safetensors(tiny_gpt2_dir, lambda s: s.update({"transformer.wpe.weight": torch.zeros(10, 32)}))
    with pytest.raises(DistilleryError, match=r"tensor transformer\.wpe\.weight has shape \(10, 32\) but "
                                              r"config\.json implies \(64, 32\)"):
        load_model(tiny_gpt2_dir)


def test_missing_tensor(tiny_gpt2_dir):
    rewrite_safetensors(tiny_gpt2_dir, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(DistilleryError, match=r"lacks 1 tensor a gpt2 causal-lm model needs, e\.g\. "
                                              r"blocks\.1\.mlp\.fc\.weight"):
        load_model(tiny_gpt2_dir)


def test_roberta_checkpoint_without_one_of_query_key_value(tiny_roberta_dir):
    rewrite_safetensors(tiny_roberta_dir, lambda s: s.pop("roberta.encoder.layer.1.attention.self.key.bias"))
    with pytest.raises(DistilleryError, match=r"lacks 1 tensor a roberta masked-lm model needs, e\.g\. "
                                              r"roberta\.layers\.1\.attn\.qkv\.bias"):
        load_model(tiny_roberta_dir)


def test_unexpected_tensor(tiny_gpt2_dir):
    rewrite_safetensors(tiny_gpt2_dir, lambda s: s.update({"transformer.h.7.ln_1.weight": torch.ones(32)}))
    with pytest.raises(DistilleryError, match=r"has 1 tensor a gpt2 causal-lm model does not use, e\.g\. "
                                              r"transformer\.h\.7\.ln_1\.weight; does config\.json match"):
        load_model(tiny_gpt2_dir)


def test_truncated_safetensors(tiny_gpt2_dir):
    file = tiny_gpt2_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(DistilleryError, match=r"model\.safetensors is not a readable safetensors file "
                                              r"\(truncated or corrupt"):
        load_model(tiny_gpt2_dir)


def test_no_weights(tiny_gpt2_dir):
    (tiny_gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(DistilleryError, match=r"has no weights: expected model\.safetensors, "
                                              r"pytorch_model\.bin or a sharded \*\.index\.json"):
        load_model(tiny_gpt2_dir)


class RunsCode:
    """Unpickling this calls os.system: what a malicious pytorch_model.bin does."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tiny_gpt2_dir, tmp_path):
    marker = tmp_path / "code-ran"
    state = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    state["payload"] = RunsCode(marker)
    torch.save(state, tiny_gpt2_dir / "pytorch_model.bin")
    (tiny_gpt2_dir / "model.safetensors").unlink()
    with pytest.raises(DistilleryError, match=r"Refused to load .*pytorch_model\.bin: it holds objects other "
                                              r"than tensors \(possibly code\)"):
        load_model(tiny_gpt2_dir)
    assert not marker.exists()


def test_plain_bin_state_dict_loads(tiny_gpt2_dir):
    expected = gpt2_logits_hf(tiny_gpt2_dir)
    torch.save(load_file(str(tiny_gpt2_dir / "model.safetensors")), tiny_gpt2_dir / "pytorch_model.bin")
    (tiny_gpt2_dir / "model.safetensors").unlink()
    torch.testing.assert_close(ours_logits(tiny_gpt2_dir), expected, atol=1e-5, rtol=0)


def test_sharded_safetensors(tmp_path):
    import transformers

    directory = save_tiny_gpt2(tmp_path / "whole")
    model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(ours_logits(tmp_path / "sharded"), gpt2_logits_hf(directory), atol=1e-5, rtol=0)


def test_missing_shard_is_named(tmp_path):
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(save_tiny_gpt2(tmp_path / "whole"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    first_shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[0]
    first_shard.unlink()
    with pytest.raises(DistilleryError, match=rf"Weight file .*{first_shard.name} is missing \(listed in the "
                                              r"shard index\)"):
        load_model(tmp_path / "sharded")


def test_gpt2_keys_without_prefix_and_old_buffers(tiny_gpt2_dir):
    expected = gpt2_logits_hf(tiny_gpt2_dir)

    def strip_prefix_add_buffers(state):
        for key in list(state):
            state[key.removeprefix("transformer.")] = state.pop(key)
        for i in range(2):  # what transformers < 4.30 saved: the causal mask and -1e4 as buffers
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    rewrite_safetensors(tiny_gpt2_dir, strip_prefix_add_buffers)
    assert "wte.weight" in load_file(str(tiny_gpt2_dir / "model.safetensors"))
    torch.testing.assert_close(ours_logits(tiny_gpt2_dir), expected, atol=1e-5, rtol=0)


def test_roberta_keys_without_prefix(tiny_roberta_dir):
    expected = roberta_logits_hf(tiny_roberta_dir)

    def strip_prefix(state):
        for key in [k for k in state if k.startswith("roberta.")]:
            state[key.removeprefix("roberta.")] = state.pop(key)

    rewrite_safetensors(tiny_roberta_dir, strip_prefix)
    torch.testing.assert_close(ours_logits(tiny_roberta_dir), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Hub ids: the huggingface_hub cache, offline


def fake_hub_cache(cache, repo_id, model_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_resolved_from_cache_offline(hub_cache, tiny_gpt2_dir):
    snapshot = fake_hub_cache(hub_cache, "some-org/tiny-gpt2", tiny_gpt2_dir)
    assert resolve_model_dir("some-org/tiny-gpt2") == snapshot
    torch.testing.assert_close(ours_logits("some-org/tiny-gpt2"), gpt2_logits_hf(tiny_gpt2_dir), atol=1e-5,
                               rtol=0)


def test_hub_id_neither_cached_nor_reachable(hub_cache):
    with pytest.raises(DistilleryError, match=r"Model 'some-org/absent-model' is not a local folder and is not "
                                              r"in the Hugging Face cache, and offline mode is on"):
        load_model("some-org/absent-model")


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(DistilleryError, match=r"No such model folder: .*nowhere/at/all; check the path"):
        load_model(tmp_path / "nowhere" / "at" / "all")


def test_file_instead_of_folder(tiny_gpt2_dir):
    with pytest.raises(DistilleryError, match=r"config\.json is a file; pass the folder that holds config\.json"):
        load_model(tiny_gpt2_dir / "config.json")


# ----------------------------------------------------------------------------------------------
# Saving: transformers loads what we write


def test_gpt2_save_pretrained_loads_in_transformers(tiny_gpt2_dir, tmp_path):
    import transformers

    model = load_model(tiny_gpt2_dir)
    model.save_pretrained(tmp_path / "saved")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs(IDS).logits, gpt2_logits_hf(tiny_gpt2_dir), atol=1e-6, rtol=0)


def test_roberta_save_pretrained_loads_in_transformers(tiny_roberta_dir, tmp_path):
    import transformers

    model = load_model(tiny_roberta_dir)
    model.save_pretrained(tmp_path / "saved")
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    assert type(theirs).__name__ == "RobertaForMaskedLM"
    ids = torch.tensor([[0, 5, 17, 42, 8, 91, 2, 1, 1]])
    mask = (ids != 1).long()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(roberta_logits_hf(tiny_roberta_dir, ids), theirs(ids).logits, atol=1e-6,
                                   rtol=0)


def test_save_pretrained_round_trip_bf16(tiny_gpt2_dir, tmp_path):
    model = load_model(tiny_gpt2_dir, dtype="bfloat16")
    model.save_pretrained(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))["transformer.wte.weight"].dtype == torch.bfloat16
    reloaded = load_model(tmp_path / "bf16")
    torch.testing.assert_close(reloaded.wte.weight, model.wte.weight.float())


def test_roberta_checkpoint_of_another_head_keeps_the_encoder(tmp_path):
    directory = save_tiny_roberta(tmp_path / "cls", "RobertaForSequenceClassification", num_labels=3)
    masked_lm = load_model(directory, task="masked-lm")
    classifier = load_model(directory)
    assert classifier.task == "sequence-classification" and masked_lm.task == "masked-lm"
    assert masked_lm.newly_initialized[0].startswith("lm_")
    torch.testing.assert_close(masked_lm.roberta.embeddings.tok.weight, classifier.roberta.embeddings.tok.weight)


def test_unknown_task_is_named(tiny_gpt2_dir):
    with pytest.raises(DistilleryError, match=r"task 'masked-lm' does not exist for gpt2 models; choose one of "
                                              r"\['causal-lm'\]"):
        load_model(tiny_gpt2_dir, task="masked-lm")


def test_unknown_dtype_is_named(tiny_gpt2_dir):
    with pytest.raises(DistilleryError, match=r"dtype 'float8' is not supported"):
        load_model(tiny_gpt2_dir, dtype="float8")
