"""bf16 and int8 weight-only models stay close to fp32; bad settings get one sentence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.generation.quantize import (
    InputMajorLinear,
    Int8Linear,
    load_quantized_model,
    quantize_model,
    to_input_major,
)
from distillery.models import DistilleryError, load_model

# Stated tolerance: the largest logit error is at most 2 % of the largest |logit| (measured about
# 0.5 % for both bf16 and int8 on the tiny random models).
RELATIVE_TOLERANCE = 0.02


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_gpt2_logits_close_to_fp32(tiny_gpt2_dir, dtype):
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = load_model(tiny_gpt2_dir)(ids).logits
        model = quantize_model(load_model(tiny_gpt2_dir), dtype)
        # Many rows take the dequantise path, a single token the packed int8 kernel.
        assert relative_error(model(ids).logits, ref) < RELATIVE_TOLERANCE
        assert relative_error(model(ids[:1, :1]).logits, ref[:1, :1]) < RELATIVE_TOLERANCE


def test_roberta_masked_lm_int8_close_to_fp32(tiny_roberta_dir):
    ids = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = load_model(tiny_roberta_dir)(ids).logits
        out = quantize_model(load_model(tiny_roberta_dir), "int8")(ids).logits
    assert relative_error(out, ref) < RELATIVE_TOLERANCE


def test_int8_cached_decoding_equals_uncached(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "int8")
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids).logits[0, -1]
        cache = model.new_cache(1, 8)
        model(ids[:, :7], cache=cache)
        step = model(ids[:, 7:], cache=cache, logits_to_keep=1).logits[0, -1]
    assert relative_error(step, full) < RELATIVE_TOLERANCE


def test_int8_replaces_every_linear_and_unties_the_head(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.dtype == torch.int8
    assert model.wte.weight.dtype == torch.float32  # the lookup stays in float
    assert model.blocks[0].ln_1.weight.dtype == torch.float32


def test_int8_linear_is_per_channel_symmetric():
    weight = torch.tensor([[1.0, -0.5, 0.25], [-100.0, 50.0, 0.0]])
    layer = Int8Linear.from_float(weight, torch.tensor([1.0, 2.0]))
    assert layer.weight.tolist() == [[127, -64, 32], [-127, 64, 0]]
    assert torch.allclose(layer.scales, torch.tensor([1 / 127, 100 / 127]))
    x = torch.randn(6, 3)
    expected = x @ layer.dequantized_weight().T + torch.tensor([1.0, 2.0])
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer(x[:1]), expected[:1], atol=1e-5)  # 3 inputs: never the packed kernel


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_int8_linear_paths_agree(rows):
    # 1 and 3 rows take the packed kernel (bf16 inputs), 7 rows the dequantise path.
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(24, 40), torch.randn(24))
    x = torch.randn(rows, 40)
    expected = x @ layer.dequantized_weight().T + layer.bias
    assert torch.allclose(layer(x), expected, rtol=2e-2, atol=5e-2)


def test_bf16_casts_everything(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_quantized_model(tiny_gpt2_dir):
    model = load_quantized_model(str(tiny_gpt2_dir), "int8")
    assert isinstance(model.blocks[0].mlp.fc, Int8Linear)


def test_unknown_dtype_names_the_choices(tiny_gpt2_dir):
    with pytest.raises(DistilleryError, match="fp32, bf16, int8"):
        quantize_model(load_model(tiny_gpt2_dir), "int4")
    with pytest.raises(DistilleryError, match="fp32, bf16, int8"):
        load_quantized_model(str(tiny_gpt2_dir), "fp8")


def test_int8_without_linear_layers_is_refused():
    with pytest.raises(DistilleryError, match="no.*nn.Linear|nn.Linear layers but"):
        quantize_model(nn.Sequential(nn.LayerNorm(4)), "int8")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_input_major_layout_computes_the_same(tiny_gpt2_dir, tiny_roberta_dir, dtype):
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    for directory in (tiny_gpt2_dir, tiny_roberta_dir):
        with torch.inference_mode():
            ref = quantize_model(load_model(directory), dtype)(ids).logits.float()
            model = to_input_major(quantize_model(load_model(directory), dtype))
            assert not any(type(m) is nn.Linear for m in model.modules())
            out = model(ids).logits.float()
        atol = 1e-5 if dtype == "fp32" else 2e-2
        assert torch.allclose(out, ref, atol=atol), float((out - ref).abs().max())


def test_input_major_decoding_equals_full_forward(tiny_gpt2_dir):
    model = to_input_major(load_model(tiny_gpt2_dir))
    assert isinstance(model.lm_head, InputMajorLinear) and model.wte.weight.shape == (99, 32)
    ids = torch.randint(0, 99, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids).logits[0, -1]
        cache = model.new_cache(1, 6)
        model(ids[:, :5], cache=cache)
        step = model(ids[:, 5:], cache=cache).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)
