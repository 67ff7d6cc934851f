"""bf16 and int8 models stay close to fp32; bad settings get one sentence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery.generation.quantize import (
    InferenceLinear,
    Int8Linear,
    int8_linear_bytes,
    quantize_model,
    to_inference_layout,
)
from distillery.models import DistilleryError, load_model

# Stated tolerance: the largest logit error is at most 2 % of the largest |logit| for bf16 and 3 %
# for int8, whose activations are quantised too (measured on the tiny random GPT-2: bf16 about
# 0.5 %, int8 about 1.1 %).
RELATIVE_TOLERANCE = {"bf16": 0.02, "int8": 0.03}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_gpt2_logits_close_to_fp32(tiny_gpt2_dir, dtype):
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = load_model(tiny_gpt2_dir)(ids).logits
        model = quantize_model(load_model(tiny_gpt2_dir), dtype)
        # Many rows share one activation scale in int8, a single token has its own.
        assert relative_error(model(ids).logits, ref) < RELATIVE_TOLERANCE[dtype]
        assert relative_error(model(ids[:1, :1]).logits, ref[:1, :1]) < RELATIVE_TOLERANCE[dtype]


def test_roberta_masked_lm_int8_close_to_fp32(tiny_roberta_dir):
    ids = torch.randint(3, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = load_model(tiny_roberta_dir)(ids).logits
        out = quantize_model(load_model(tiny_roberta_dir), "int8")(ids).logits
    assert relative_error(out, ref) < RELATIVE_TOLERANCE["int8"]


def test_int8_cached_decoding_equals_uncached(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "int8")
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids).logits[0, -1]
        cache = model.new_cache(1, 8)
        model(ids[:, :7], cache=cache)
        step = model(ids[:, 7:], cache=cache, logits_to_keep=1).logits[0, -1]
    # Not bit-identical: the prompt's rows and the new token are quantised with different scales.
    assert relative_error(step, full) < RELATIVE_TOLERANCE["int8"]


def test_int8_replaces_every_linear_and_unties_the_head(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight().dtype == torch.qint8
    assert model.wte.weight.dtype == torch.float32  # the lookup stays in float
    assert model.blocks[0].ln_1.weight.dtype == torch.float32


def test_int8_weights_are_per_channel_symmetric():
    linear = nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 0.25], [-100.0, 50.0, 0.0]]))
    layer = quantize_model(nn.Sequential(linear), "int8")[0]
    weight = layer.weight()
    # Symmetric: zero points 0 and scale = max|w_row| / 127.5, the half-width of [-128, 127].
    assert weight.q_per_channel_zero_points().tolist() == [0, 0]
    assert torch.allclose(weight.q_per_channel_scales().float(), torch.tensor([1 / 127.5, 100 / 127.5]))
    assert weight.int_repr().tolist() == [[127, -64, 32], [-128, 64, 0]]
    assert int8_linear_bytes(layer) == 6 + 2 * 4 + 2 * 4


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_int8_linear_close_to_its_dequantised_weight(rows):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = quantize_model(nn.Sequential(linear), "int8")[0]
    x = torch.randn(2, rows, 40)
    expected = x @ layer.weight().dequantize().T + linear.bias
    # Activations quantised to 7 bits over their range: errors of about range / 254 per input.
    assert torch.allclose(layer(x), expected, atol=0.1), float((layer(x) - expected).abs().max())


def test_bf16_casts_everything(tiny_gpt2_dir):
    model = quantize_model(load_model(tiny_gpt2_dir), "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_dtype_names_the_choices(tiny_gpt2_dir):
    with pytest.raises(DistilleryError, match="fp32, bf16, int8"):
        quantize_model(load_model(tiny_gpt2_dir), "int4")


def test_int8_without_linear_layers_is_refused():
    with pytest.raises(DistilleryError, match="nn.Linear layers but Sequential has none"):
        quantize_model(nn.Sequential(nn.LayerNorm(4)), "int8")


def test_int8_off_the_cpu_is_refused():
    with pytest.raises(DistilleryError, match="CPU only but the model is on meta"):
        quantize_model(nn.Sequential(nn.Linear(4, 4, device="meta")), "int8")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("onednn_min_bytes", [0, None])  # every weight packed; the default (none, this small)
def test_inference_layout_computes_the_same(tiny_gpt2_dir, tiny_roberta_dir, dtype, onednn_min_bytes):
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    for directory in (tiny_gpt2_dir, tiny_roberta_dir):
        with torch.inference_mode():
            ref = quantize_model(load_model(directory), dtype)(ids).logits.float()
            model = to_inference_layout(quantize_model(load_model(directory), dtype), onednn_min_bytes)
            assert not any(type(m) is nn.Linear for m in model.modules())
            out = model(ids).logits.float()
        atol = 1e-5 if dtype == "fp32" else 2e-2
        assert torch.allclose(out, ref, atol=atol), float((out - ref).abs().max())


LAYOUTS = {"onednn-packed": dict(onednn_min_bytes=0), "onednn-input-major": dict(onednn_min_bytes=0, one_row=True),
           "input-major": dict(onednn_min_bytes=None)}  # the last: the default threshold, over these small weights


@pytest.mark.parametrize("shape", [(1, 48), (9, 48), (2, 40, 48), (300, 48)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_linear_equals_linear(shape, bias, layout):
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layer = InferenceLinear(linear, **LAYOUTS[layout])
    if torch.backends.mkldnn.is_available():
        assert layer.layout == layout
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)
    assert layer.weight_bytes() == 48 * 80 * 4 + 80 * 4 * bias


def test_inference_linear_layout_follows_size_dtype_and_role():
    onednn = torch.backends.mkldnn.is_available()
    assert (InferenceLinear(nn.Linear(8, 4), onednn_min_bytes=8 * 4 * 4).layout == "onednn-packed") == onednn
    small = InferenceLinear(nn.Linear(8, 4), onednn_min_bytes=8 * 4 * 4 + 1)
    assert small.layout == "input-major" and small.weight_t.shape == (8, 4)
    assert InferenceLinear(nn.Linear(8, 4)).layout == "input-major"  # under the default ONEDNN_MIN_BYTES
    bf16 = InferenceLinear(nn.Linear(8, 4).to(torch.bfloat16), onednn_min_bytes=0, one_row=True)
    assert bf16.layout == "input-major" and bf16.weight_t.shape == (8, 4)


def test_vocabulary_heads_get_the_one_row_layout(tiny_gpt2_dir, tiny_roberta_dir):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN layouts need a CPU build with oneDNN")
    gpt2 = to_inference_layout(load_model(tiny_gpt2_dir), onednn_min_bytes=0)
    roberta = to_inference_layout(load_model(tiny_roberta_dir), onednn_min_bytes=0)
    assert gpt2.lm_head.layout == roberta.lm_decoder.layout == "onednn-input-major"
    assert gpt2.blocks[0].mlp.fc.layout == roberta.roberta.layers[0].fc.layout == "onednn-packed"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_linear_under_torch_compile(layout):
    linear = nn.Linear(16, 24)
    layer = InferenceLinear(linear, **LAYOUTS[layout])
    x = torch.randn(3, 16)
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(layer, dynamic=True)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_inference_layout_decoding_equals_full_forward(tiny_gpt2_dir):
    model = to_inference_layout(load_model(tiny_gpt2_dir))
    assert isinstance(model.lm_head, InferenceLinear) and model.wte.weight.shape == (99, 32)
    ids = torch.randint(0, 99, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids).logits[0, -1]
        cache = model.new_cache(1, 6)
        model(ids[:, :5], cache=cache)
        step = model(ids[:, 5:], cache=cache).logits[0, -1]
    assert torch.allclose(step, full, atol=1e-5)
