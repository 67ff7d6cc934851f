"""Smaller weights for faster decoding: bf16, and int8 weight-only with per-output-channel scales.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: halving
the bytes per weight (bf16) or quartering them (int8) is what makes it faster. int8 here is
weight-only (gpt-fast style): activations stay in floating point, each output channel of a linear
layer has its own symmetric scale, `y = (x @ W_int8.T) * scale + bias`.

What is fastest on this CPU was measured, not assumed (2-core AVX2 x86 without native bf16 or
VNNI, torch 2.13, a shared and noisy machine):
- one or a few rows (batch-1 decoding): `torch.ops.aten._weight_int8pack_mm` reads the int8
  weight directly; it is only vectorised for bf16 activations (the fp32 variant was several times
  slower), so activations are cast to bf16 for it. It is compute-bound here: about 11 ms for the
  50257 x 768 LM head at one thread, no faster than fp32 in the input-major layout (9 ms), so int8
  decoding is about as fast as fp32 on this CPU. FBGEMM's dynamic int8 linear
  (`torch.ao.quantization.quantize_dynamic`, which also quantises activations) took 3.5 ms.
- many rows (prefill, long batches): dequantising the weight and calling `F.linear`;
- `torch.compile` of the dequantise-and-multiply did not fuse on the CPU and was far slower.
- bf16 matrix multiplies are emulated on this CPU and ran 20-40x slower than fp32: bf16 saves
  memory here, not time.

Float weights are faster to decode with in the other layout: `F.linear` with nn.Linear's
(out, in) weight at one row reached about 12 GB/s on this CPU, `addmm` with the weight stored
(in, out) about 20 GB/s on the LM head, and a distilgpt2-shaped decode step was 15-20 % faster with
every layer so (at one thread). `to_input_major` makes that change for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillery.models.common import DistilleryError

QUANTIZE_DTYPES = ("fp32", "bf16", "int8")

# At most this many rows of activations go through the packed int8 kernel; more use dequantise.
PACKED_KERNEL_MAX_ROWS = 4
# The packed kernel reads the input dimension in blocks of 8: with other sizes it returned garbage
# or crashed (torch 2.13), so those layers always dequantise.
PACKED_KERNEL_IN_MULTIPLE = 8


def _packed_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A linear layer holding an int8 weight (out, in) and one float scale per output channel."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.size(1)
        self.out_features = weight.size(0)
        self.register_buffer("weight", weight)  # int8 (out, in)
        self.register_buffer("scales", scales)  # float (out,)
        self.packed_kernel = (self.in_features % PACKED_KERNEL_IN_MULTIPLE == 0) and _packed_kernel_available()
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   scale_dtype: torch.dtype = torch.float32) -> Int8Linear:
        """Symmetric per-output-channel quantisation: scale = max|w_row| / 127."""
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        b = bias.detach().clone() if bias is not None else None
        return cls(q, scales.to(scale_dtype), b)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.packed_kernel and rows <= PACKED_KERNEL_MAX_ROWS and x.device.type == "cpu":
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class InputMajorLinear(nn.Module):
    """A float linear layer whose weight is stored transposed, (in, out): y = x @ W_t + b."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.addmm(self.bias, flat, self.weight_t) if self.bias is not None else flat @ self.weight_t
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def to_input_major(model: nn.Module) -> nn.Module:
    """Store every float `nn.Linear` weight as (in, out) for faster decoding, in place; eval mode.

    A tied LM head gets its own transposed copy (the embedding keeps the original for lookups), so
    fp32 GPT-2 holds the vocabulary matrix twice. For inference only: the model can no longer be
    saved with `save_pretrained` nor trained.
    """
    model.eval()
    for name, linear in _linears(model):
        _replace(model, name, InputMajorLinear(linear))
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, dtype: str) -> nn.Module:
    """Return `model` with smaller weights, changed in place: "fp32", "bf16" or "int8".

    "bf16" casts every parameter and buffer. "int8" replaces every `nn.Linear` (the tied LM head
    included, as its own int8 copy; the embedding lookup stays in float) by an `Int8Linear`;
    LayerNorms, embeddings and biases keep their float dtype. The model is put in eval mode.
    """
    if dtype not in QUANTIZE_DTYPES:
        raise DistilleryError(f"dtype {dtype!r} is not supported; choose one of {', '.join(QUANTIZE_DTYPES)}.")
    model.eval()
    if dtype == "fp32":
        return model.to(torch.float32)
    if dtype == "bf16":
        return model.to(torch.bfloat16)
    linears = _linears(model)
    if not linears:
        raise DistilleryError(
            f"int8 quantisation needs nn.Linear layers but {type(model).__name__} has none; "
            "use dtype 'fp32' or 'bf16' for it."
        )
    for name, linear in linears:
        # Replacing the module (not its weight) unties a tied head: the embedding keeps its float
        # weight for lookups, the head gets an int8 copy.
        _replace(model, name, Int8Linear.from_float(linear.weight, linear.bias, linear.weight.dtype))
    return model


def load_quantized_model(name_or_path: str, dtype: str = "fp32", task: str | None = None,
                         device: str = "cpu") -> nn.Module:
    """`load_model` in fp32, then `quantize_model(model, dtype)`: the one call pipelines need."""
    from distillery.models import load_model

    if dtype not in QUANTIZE_DTYPES:
        raise DistilleryError(f"dtype {dtype!r} is not supported; choose one of {', '.join(QUANTIZE_DTYPES)}.")
    return quantize_model(load_model(name_or_path, task=task, device=device), dtype)
