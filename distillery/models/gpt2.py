"""GPT-2 family causal language model in plain PyTorch.

Reads top to bottom: config -> attention -> MLP -> block -> model -> Hugging Face key map.
Shapes in comments use B (batch), T (new tokens), S (tokens in the cache after this step),
H (heads), D (head size), C (embedding size), V (vocabulary).

Quirks of GPT-2 kept on purpose: learned absolute positions, pre-LayerNorm blocks, the tanh
approximation of GELU ("gelu_new"), a LayerNorm after the last block, and an LM head tied to the
token embedding. Hugging Face stores the linear layers as Conv1D with transposed weights; they are
transposed once, in `hf_to_ours` / `ours_to_hf`, and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillery.models.common import ConfigError, KVCache, ModelOutput, Pretrained, activation_fn

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    # Everything else config.json carried (task_specific_params, generation defaults, ...),
    # kept so that a save round-trips and pipelines can read the checkpoint's defaults.
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive integer, got {value!r}.")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})."
            )
        activation_fn(self.activation_function)  # raises ConfigError naming the field

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        if name not in GPT2_PRESETS:
            raise ConfigError(f"Unknown GPT-2 preset {name!r}; choose one of {sorted(GPT2_PRESETS)}.")
        return cls(**{**GPT2_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Build from a Hugging Face config.json dict; unknown keys are kept in `extra`."""
        unsupported = {
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "scale_attn_weights": True,
            "add_cross_attention": False,
        }
        for key, default in unsupported.items():
            if hf.get(key, default) != default:
                raise ConfigError(
                    f"config.json sets {key}={hf[key]!r}, which distillery's GPT-2 does not support "
                    f"(only {default!r})."
                )
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in hf.items() if k in names}
        skip = names | set(unsupported) | _HF_DERIVED_KEYS
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out.update(self.extra)
        out["model_type"] = "gpt2"
        out.setdefault("architectures", ["GPT2LMHeadModel"])
        # transformers reads these names too.
        out.setdefault("n_ctx", self.n_positions)
        return out


# config.json keys that are re-derived on save rather than carried over.
_HF_DERIVED_KEYS = {"model_type", "architectures", "n_ctx", "torch_dtype", "dtype", "transformers_version"}

GPT2_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


# ----------------------------------------------------------------------------------------------
# Modules


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        mask: torch.Tensor | None,  # (B, 1, T, S) bool, True = may attend; None = plain causal
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        dropout = self.attn_dropout if self.training else 0.0
        if mask is None:
            # No padding and no earlier cache: plain causal; one new token sees the whole cache.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))
        return self.resid_dropout(y) if self.training else y  # a module call less per step when decoding


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_width)
        self.act = activation_fn(config.activation_function)
        self.proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.act(self.fc(x)))
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(Pretrained):
    """GPT-2 language model (the equivalent of transformers' GPT2LMHeadModel)."""

    family = "gpt2"
    task = "causal-lm"
    vocabulary_head = "lm_head"

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (1/sqrt(2 * n_layer)).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, max_length, c.head_dim, self.dtype, self.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S): 1 = token, 0 = padding
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,  # 0: logits at every position; n: only the last n (decoding)
        return_logits: bool = True,  # False: no logits, the head's input as `head_input` instead
    ) -> ModelOutput:
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if S > self.config.n_positions:
            raise ValueError(
                f"The sequence is {S} tokens long but the model has only {self.config.n_positions} "
                "positions; shorten the prompt or lower max_length / max_new_tokens."
            )
        if cache is not None and cache.write_at is not None:
            mask = _fixed_slot_mask(input_ids, attention_mask, position_ids, cache)
        else:
            position_ids, mask = _positions_and_mask(input_ids, attention_mask, position_ids, past)

        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        if self.training:
            x = self.drop(x)
        hidden_states = [x] if output_hidden_states else None
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
            if hidden_states is not None and i < len(self.blocks) - 1:
                hidden_states.append(x)
        if cache is not None:
            cache.length = S
        x = self.ln_f(x)
        if hidden_states is not None:
            hidden_states.append(x)  # transformers' last hidden state is after ln_f
        head_in = x[:, -logits_to_keep:] if logits_to_keep else x
        return ModelOutput(
            logits=self.lm_head(head_in) if return_logits else None,
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            head_input=None if return_logits else head_in,
        )


def _positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        position_ids: torch.Tensor | None, past: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids (given, or counted) and the (B, 1, T, S) attention mask for the T new tokens
    after `past` cached ones; the mask is None where plain causal attention does (no padding)."""
    (B, T), device = input_ids.shape, input_ids.device
    S = past + T
    if attention_mask is not None and attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must have shape {(B, S)}, got {tuple(attention_mask.shape)}.")
    # One host sync, not two; none under torch.compile, where reading it would break the graph (the
    # padded path gives the same result for a mask of ones).
    padded = attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all()))
    if position_ids is None:
        if padded:
            # Padding: number real tokens from 0, as transformers' generate does.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        else:
            position_ids = torch.arange(past, S, device=device).unsqueeze(0)
    if padded:
        return position_ids, padded_causal_mask(attention_mask.bool(), T)
    if T > 1 and past > 0:
        return position_ids, padded_causal_mask(torch.ones(B, S, dtype=torch.bool, device=device), T)
    return position_ids, None


def _fixed_slot_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """The (B, 1, 1, max_length) mask of a fixed-shape step (a cache with `write_at`, for a CUDA
    graph): every cache slot is attended, masked to those holding tokens, and no device value is
    read on the host."""
    B, T = input_ids.shape
    if T != 1 or position_ids is None or attention_mask is None or attention_mask.shape != (B, cache.max_length):
        raise ValueError("A cache with write_at takes one token per row, position_ids, and an "
                         "attention_mask over all of its max_length slots.")
    return attention_mask.bool()[:, None, None, :]


def padded_causal_mask(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S) key padding mask -> (B, 1, T, S) bool mask for the last T queries.

    A query may see keys that are real tokens and not in its future. Rows that would see
    nothing (a pad query with every earlier key padded) may see themselves, so that attention
    stays finite; their outputs are never used.
    """
    B, S = key_mask.shape
    q_pos = torch.arange(S - T, S, device=key_mask.device).view(T, 1)
    k_pos = torch.arange(S, device=key_mask.device).view(1, S)
    causal = k_pos <= q_pos  # (T, S)
    mask = causal.unsqueeze(0) & key_mask.unsqueeze(1)  # (B, T, S)
    mask = mask | (k_pos == q_pos).unsqueeze(0)
    return mask.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# Hugging Face key map: their GPT2LMHeadModel layout <-> ours.

_HF_RENAMES = [
    (".attn.c_attn.", ".attn.qkv."),
    (".attn.c_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc."),
    (".mlp.c_proj.", ".mlp.proj."),
]
# Conv1D layers store (in, out); nn.Linear stores (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older transformers versions saved with the weights; not parameters.
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 state dict (with or without the `transformer.` prefix) -> ours."""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if name.endswith(_HF_BUFFERS):
            continue
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        if name.startswith("h."):
            name = "blocks." + name[2:]
            for theirs, ours in _HF_RENAMES:
                name = name.replace(theirs, ours)
        out[name] = tensor
    out.pop("lm_head.weight", None)  # tied to wte
    return out


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' GPT2LMHeadModel layout (lm_head left out: it is tied)."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name.startswith("blocks."):
            name = "h." + name[len("blocks.") :]
            for theirs, ours in _HF_RENAMES:
                name = name.replace(ours, theirs)
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        out["transformer." + name] = tensor.contiguous()
    return out
