"""Smaller weights for faster decoding: bf16, and int8 with per-output-channel weight scales.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth as long as
the multiply keeps up: int8 weights quarter the bytes, but only a kernel that multiplies in integers
is fast enough for that to show on this CPU. "int8" is therefore FBGEMM's dynamic int8 linear layer
(`torch.ao.nn.quantized.dynamic.Linear`, CPU only): weights int8, symmetric, one scale per output
channel, packed once; activations quantised to 7-bit unsigned integers on the fly, with one scale
for the whole input of each call (all rows of a batch together); int32 accumulation, float32
output and bias. So int8 logits differ from fp32 a little more than with weight-only int8, and a
sequence's int8 logits depend slightly on what else is in its batch.

Measured on this CPU (2-core AVX2 x86 without native bf16 or VNNI, torch 2.13, shared and noisy,
so expect +-30 %): greedy decode tokens/s at batch 1, distilgpt2 shape with random weights,
16-token prompt, best of 3; one run per thread count, ratio to transformers' fp32 `generate`:

    threads  transformers fp32  ours fp32    int8 weight-only  int8 dynamic (this)  fp16 dynamic
    1        31.8               34.4 1.08x   44.9 1.41x        68.8 2.16x           51.8 1.63x
    2        30.6               42.9 1.40x   70.6 2.31x        84.9 2.77x           71.3 2.33x

On a quieter moment int8 dynamic reached 101 tok/s at one thread (3.0x transformers' 33.4), and
`distillery bench preset:distilgpt2 --dtype fp32,int8 --batch 1` gave int8 2.50x (1 thread) and
3.05x (2 threads) transformers' fp32 decoding, and a 1.9-2.2x faster 8x256 forward pass.
- "int8 weight-only" was the previous implementation, `aten._weight_int8pack_mm` with int8 weights
  and bf16 activations: compute-bound here, as bf16 arithmetic is emulated on this CPU.
- "fp16 dynamic": FBGEMM's fp16-weight linear (`float16_dynamic_qconfig`), float activations.
- Per-tensor int8 weight scales were no faster than per-channel and slightly less accurate.
- In the int8 decode step about 80 % of the time is in the int8 linear layers (about 9 GB/s of
  int8 weights): the integer multiply-adds, not memory, limit it without VNNI.
- `torch.compile` of a dequantise-and-multiply did not fuse on the CPU and was far slower; bf16
  matrix multiplies ran 20-40x slower than fp32: bf16 saves memory here, not time.

Quality: perplexity on the first 90,000 characters of WikiText-2 raw test (20,497 tokens; windows
of 256, stride 128) of a small GPT-2 (4 layers, 256 wide, GPT-2 tokenizer) trained for only 50
steps on books (an early model, so its activations have fewer outliers than a well-trained one):
fp32 21888.2, bf16 21854.3 (-0.15 %), int8 dynamic 21988.8 (+0.46 %), int8 weight-only 21900.3
(+0.06 %), int8 dynamic per-tensor weights 21993.8 (+0.48 %), fp16 dynamic 21887.6 (-0.00 %).
`bench/bench_quality.py MODEL_DIR` measures this for a trained model.

Float weights are faster to multiply few rows with in another layout than nn.Linear's. Measured on
this CPU at 2 threads, reading all distilgpt2 weight matrices in a row for one token: `F.linear`
(out, in) 16 GB/s, `addmm` with the weight stored (in, out) 22 GB/s, oneDNN with the weight
prepacked once 27 GB/s; for 8 rows 8 vs 13 GB/s. A 256 MB oneDNN product reached 33-35 GB/s while
summing a tensor read 39-41 GB/s. A distilgpt2 decode step went from 16.7 ms (input-major) to
13.2 ms (prepacked), and a 9-token fill-mask from about 22 ms to 19-20 ms; an 8x256 forward pass
is within noise either way. `to_inference_layout` makes that change for inference, with two
exceptions found later:
- A vocabulary head (50265 x 768) multiplied for one row by oneDNN from its plain (in, out)
  storage read 40 GB/s, as fast as the summed read, against 31 GB/s prepacked (3.4-3.9 ms vs
  4.9-5.4 ms; 2 rows 7.8 vs 5.6 ms, 8 rows 10.6 vs 7.8 ms, 2048 rows equal). The head sees one row
  per sequence, so it keeps that layout: distilgpt2 batch-1 decoding went from 76 to 87 tokens/s,
  batch-8 decoding lost about 10 %.
- Under 2 MiB of weight a oneDNN call costs more than the product (see `ONEDNN_MIN_BYTES`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear  # the layer "int8" puts in place

from distillery.models.common import DistilleryError

QUANTIZE_DTYPES = ("fp32", "bf16", "int8")


def int8_linear_bytes(layer: Int8Linear) -> int:
    """Bytes one int8 layer reads per call: the int8 weight, a float32 scale per output channel, the bias."""
    bias = layer.bias()
    bias_bytes = bias.numel() * bias.element_size() if bias is not None else 0
    return layer.weight().numel() + 4 * layer.out_features + bias_bytes


class InferenceLinear(nn.Module):
    """A frozen float linear layer with its weight stored in the layout fastest for few-row products.

    `layout` is one of:
    - "onednn-packed": on a CPU with oneDNN, float32 weights of at least `onednn_min_bytes`, the
      weight prepacked once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`,
      the kernel torch.compile's CPU freezing uses), multiplied by `torch.ops.mkldnn._linear_pointwise`.
    - "onednn-input-major": the same, but for a layer that mostly sees one row at a time (`one_row`:
      a vocabulary head, which runs at the last position when decoding and at the masks in
      fill-mask). The weight is stored (in, out) and handed to oneDNN as it is, which streams it at
      the memory's speed for one row and is slower than the packed layout for several.
    - "input-major": elsewhere (smaller weights, bf16, no oneDNN), the weight transposed to
      (in, out) for `addmm`, the layout of GPT-2's own Conv1D.
    y = x W^T + b in every layout; results differ from `F.linear` by float rounding only (about
    1e-6 relative).
    """

    inference_only = True  # save_pretrained refuses models holding one

    def __init__(self, linear: nn.Linear, onednn_min_bytes: int | None = None, one_row: bool = False) -> None:
        super().__init__()
        if onednn_min_bytes is None:
            onednn_min_bytes = ONEDNN_MIN_BYTES
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None
        onednn = (weight.dtype == torch.float32 and weight.device.type == "cpu" and _onednn_available()
                  and weight.numel() * weight.element_size() >= onednn_min_bytes)
        self.layout = "input-major" if not onednn else "onednn-input-major" if one_row else "onednn-packed"
        # `weight_t`: the (in, out) storage, a parameter; None when packed. `onednn_weight`: what
        # oneDNN multiplies by, as (out, in): the packed tensor, opaque (its strides mean nothing)
        # and so a plain attribute that nothing (state_dict, .to()) treats as a weight, or
        # `weight_t` seen transposed; None for `addmm`.
        self.weight_t, self.onednn_weight = None, None
        if self.layout == "onednn-packed":
            self.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACKING_ROWS)
        else:
            self.weight_t = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            if self.layout == "onednn-input-major":
                self.onednn_weight = self.weight_t.t()

    def weight_bytes(self) -> int:
        """Bytes of weight and bias one call reads."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        weight = self.onednn_weight if self.weight_t is None else self.weight_t
        return self.in_features * self.out_features * weight.element_size() + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flattened to 2-D for every kernel: oneDNN takes 3-D inputs too, but about 3 us slower a call.
        flat = x.reshape(-1, self.in_features)
        if self.onednn_weight is None:
            y = torch.addmm(self.bias, flat, self.weight_t) if self.bias is not None else flat @ self.weight_t
        elif torch.compiler.is_compiling():
            y = onednn_linear(flat, self.onednn_weight, self.bias, self.out_features)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat, self.onednn_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.layout}")


# The row count oneDNN packs for. Measured on the 2-core AVX2 CPU (distilroberta-base / distilgpt2
# shapes): 16 made a 9-token fill-mask 10 % faster than 1, left one-row decoding unchanged, and an
# 8x256 forward pass within noise of the largest hints.
PACKING_ROWS = 16
# Below this many weight bytes a oneDNN call costs more than the product: about 30 us of fixed cost
# against 9-30 us for `addmm` at one row, on the same CPU (256x256 9 vs 29 us, 256x1024 29 vs 40 us;
# at 3-4 MB oneDNN is ahead, 512x2048 70 vs 88 us). A 6-layer 256-wide GPT-2 decode step went from
# 2.95 to 2.40 ms, its 3-layer student from 1.53 to 1.20 ms; distilgpt2 shapes are all above it.
ONEDNN_MIN_BYTES = 2 * 2**20


@torch.library.custom_op("distillery::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The prepacked product as an opaque operator, so that torch.compile calls it as it is (its
    own lowering of `_linear_pointwise` expects weights it packed itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def to_inference_layout(model: nn.Module, onednn_min_bytes: int | None = None) -> nn.Module:
    """Replace every float `nn.Linear` by an `InferenceLinear`, in place; eval mode.

    Weights under `onednn_min_bytes` (default `ONEDNN_MIN_BYTES`; 0 packs every float32 weight)
    take the (in, out) layout; the model's `vocabulary_head` (if it names one) is laid out for one
    row. A tied LM head gets its own copy in the new layout (the embedding keeps the original for
    lookups), so an fp32 GPT-2 holds the vocabulary matrix twice. For inference only: the model can
    no longer be saved with `save_pretrained`, trained, or moved to another device or dtype.
    """
    model.eval()
    head = getattr(model, "vocabulary_head", None)
    for name, linear in _linears(model):
        _replace(model, name, InferenceLinear(linear, onednn_min_bytes, one_row=name == head))
    return model


def prepare_for_inference(model: nn.Module, int8: bool = False) -> nn.Module:
    """What pipelines run: `quantize_model(model, "int8")` when `int8`; otherwise a float32 model
    on the CPU gets `to_inference_layout`, and any other model is returned as it is."""
    if int8:
        return quantize_model(model, "int8")
    weight = next(model.parameters())
    if weight.device.type == "cpu" and weight.dtype == torch.float32:
        return to_inference_layout(model)
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, dtype: str) -> nn.Module:
    """Return `model` with smaller weights, changed in place: "fp32", "bf16" or "int8".

    "bf16" casts every parameter and buffer. "int8" (CPU only) replaces every `nn.Linear` by an
    `Int8Linear` (module docstring: int8 weights per output channel, activations quantised per
    call); the tied LM head becomes its own int8 copy, while embeddings, LayerNorms and biases stay
    float32. The model is put in eval mode. An int8 model is for inference only: it cannot be
    trained, saved with `save_pretrained` nor reloaded from a state dict; quantise the float
    checkpoint again after loading instead.
    """
    if dtype not in QUANTIZE_DTYPES:
        raise DistilleryError(f"dtype {dtype!r} is not supported; choose one of {', '.join(QUANTIZE_DTYPES)}.")
    model.eval()
    if dtype == "fp32":
        return model.to(torch.float32)
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise DistilleryError(
            f"int8 quantisation needs nn.Linear layers but {type(model).__name__} has none; "
            "use dtype 'fp32' or 'bf16' for it."
        )
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices != {"cpu"}:
        raise DistilleryError(
            f"int8 runs on the CPU only but the model is on {', '.join(sorted(devices - {'cpu'}))}; "
            "use device 'cpu' for int8, or dtype 'bf16' on that device."
        )
    model.to(torch.float32)
    with warnings.catch_warnings():
        # torch marks torch.ao.quantization and quantized tensors deprecated in favour of torchao
        # (not installed); they still work in torch 2.13, and the warnings would only confuse users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        # Swapping modules (not weights) unties a tied head: the embedding keeps its float weight.
        torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True
        )
    return model
