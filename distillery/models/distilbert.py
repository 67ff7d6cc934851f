"""DistilBERT family encoder and its task heads in plain PyTorch.

Reads top to bottom: config -> embeddings -> layer -> encoder -> heads -> key map.
Shapes: B (batch), T (tokens), C (hidden size, `dim`), V (vocabulary).

DistilBERT is BERT-base with half the layers, no token types and no pooler, and its own config
and key names (dim, n_layers, hidden_dim; q_lin, sa_layer_norm, ffn.lin1, vocab_projector, ...).
Quirks kept on purpose: positions numbered from 0 whatever the padding; `sinusoidal_pos_embds`
makes the position table the fixed sine/cosine one (not trained); LayerNorm eps is 1e-12
whatever the config says; the attention output joins the residual without dropout (only the FFN
output is dropped out); the classification head is pre_classifier -> ReLU -> dropout
(seq_classif_dropout) -> classifier on the first token; QA drops out with qa_dropout.
The self-attention (query, key and value stacked into one `attn.qkv`) is RoBERTa's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distillery.models.common import ConfigError, ModelOutput, Pretrained, activation_fn
from distillery.models.roberta import SelfAttention, _rename, _stack_qkv
from distillery.models.roberta import init_weights as _init_linear_and_embeddings

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class DistilBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072  # FFN width
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int | None = 0
    # Label names for classification heads ({"0": "NEGATIVE", ...} in config.json).
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None  # "regression" for STS-B style heads
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "distilbert"
    layer_norm_eps = 1e-12  # fixed in DistilBERT, not a config field

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"DistilBertConfig.{name} must be a positive integer, got {value!r}.")
        if self.dim % self.n_heads:
            raise ConfigError(f"DistilBertConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}).")
        if self.sinusoidal_pos_embds and self.dim % 2:
            raise ConfigError(f"DistilBertConfig.dim ({self.dim}) must be even when sinusoidal_pos_embds is true.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"DistilBertConfig.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size "
                f"({self.vocab_size}), or null."
            )
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        if not self.id2label:
            raise ConfigError("DistilBertConfig.id2label must name at least one label.")
        activation_fn(self.activation)

    # The names the rest of distillery (and transformers' attribute_map) reads.
    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def intermediate_size(self) -> int:
        return self.hidden_dim

    @property
    def n_layer(self) -> int:
        return self.n_layers

    @property
    def num_layers(self) -> int:
        return self.n_layers

    @property
    def n_head(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def attention_probs_dropout_prob(self) -> float:
        return self.attention_dropout

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_tokens(self) -> int:
        """Longest input: one position per token, from 0."""
        return self.max_position_embeddings

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DistilBertConfig:
        if name not in DISTILBERT_PRESETS:
            raise ConfigError(f"Unknown DistilBERT preset {name!r}; choose one of {sorted(DISTILBERT_PRESETS)}.")
        return cls(**{**DISTILBERT_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> DistilBertConfig:
        """Build from a Hugging Face config.json dict; unknown keys are kept in `extra`."""
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in hf.items() if k in names}
        if "num_labels" in hf and "id2label" not in hf:
            known["id2label"] = {i: f"LABEL_{i}" for i in range(int(hf["num_labels"]))}
        derived = {"model_type", "num_labels", "label2id", "architectures", "torch_dtype", "dtype",
                   "transformers_version"}
        extra = {k: v for k, v in hf.items() if k not in names and k not in derived}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = {v: k for k, v in self.id2label.items()}
        out.update(self.extra)
        out["model_type"] = "distilbert"
        return out


DISTILBERT_PRESETS: dict[str, dict[str, Any]] = {
    "distilbert-base-uncased": dict(n_layers=6, n_heads=12, dim=768, hidden_dim=3072),
}


# ----------------------------------------------------------------------------------------------
# Encoder


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed table (n_positions, dim): for position p and column j, with a = p / 10000^(2*(j//2)/dim),
    sin(a) in even columns and cos(a) in odd ones (computed in float64, as transformers does)."""
    p = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = p / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


class Embeddings(nn.Module):
    """word + position (0, 1, 2, ...), then LayerNorm; no token types."""

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.pos = nn.Embedding(config.max_position_embeddings, config.dim)
        self.ln = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.sinusoidal = config.sinusoidal_pos_embds
        if self.sinusoidal:
            self.pos.weight.requires_grad_(False)  # a fixed table: never trained

    def reset_positions(self) -> None:
        """Write the fixed sine/cosine table (a sinusoidal config only)."""
        if self.sinusoidal:
            with torch.no_grad():
                self.pos.weight.copy_(sinusoidal_positions(*self.pos.weight.shape))

    def forward(self, input_ids, position_ids=None):
        T = input_ids.size(1)
        pos = self.pos.weight[:T] if position_ids is None else self.pos(position_ids)  # (T, C) broadcasts
        x = self.ln(self.tok(input_ids) + pos)
        return self.dropout(x) if self.training else x


class Layer(nn.Module):
    """Post-LayerNorm: ln(x + attn(x)), then ln(x + dropout(lin2(act(lin1(x)))))."""

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_ln = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.fc = nn.Linear(config.dim, config.hidden_dim)
        self.act = activation_fn(config.activation)
        self.proj = nn.Linear(config.hidden_dim, config.dim)
        self.mlp_ln = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        x = self.attn_ln(x + self.attn(x, mask))  # DistilBERT drops nothing out here
        y = self.proj(self.act(self.fc(x)))
        return self.mlp_ln(x + (self.dropout(y) if self.training else y))


def init_weights(module: nn.Module, config: DistilBertConfig) -> None:
    """Normal(0, initializer_range) linear and embedding weights, then the fixed position tables."""
    _init_linear_and_embeddings(module, config)
    for m in module.modules():
        if isinstance(m, Embeddings):
            m.reset_positions()


class DistilBertModel(Pretrained):
    """The bare encoder (transformers' DistilBertModel)."""

    family = "distilbert"
    task = "base"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layers))
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T): 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # accepted for a common signature; DistilBERT has none
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """last_hidden_state (B, T, C); hidden_states: embeddings, then each layer's output.

        token_type_ids are ignored, as a BERT tokenizer produces them and DistilBERT has no such table.
        """
        T = input_ids.size(1)
        if T > self.config.max_tokens:
            raise ValueError(
                f"The input is {T} tokens long but the model takes at most {self.config.max_tokens}; "
                "shorten the text or pass truncation=True."
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that may be seen
        x = self.embeddings(input_ids, position_ids)
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask)
            if hidden_states is not None:
                hidden_states.append(x)
        return ModelOutput(
            logits=x,
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


# ----------------------------------------------------------------------------------------------
# Heads. Each holds the encoder as `.distilbert` and calls it first.


class _WithEncoder(Pretrained):
    family = "distilbert"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__()
        self.config = config
        self.distilbert = DistilBertModel(config)


class DistilBertForMaskedLM(_WithEncoder):
    """logits = vocab_projector(LayerNorm(act(vocab_transform(h)))), projector weight = word embeddings."""

    task = "masked-lm"
    vocabulary_head = "lm_decoder"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        C = config.dim
        self.lm_dense = nn.Linear(C, C)
        self.lm_act = activation_fn(config.activation)
        self.lm_ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.lm_decoder = nn.Linear(C, config.vocab_size)  # weight tied to the word embeddings
        init_weights(self, config)
        self.lm_decoder.weight = self.distilbert.embeddings.tok.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        logits_positions: torch.Tensor | None = None,  # (B, T) bool: compute the head only there
        return_logits: bool = True,  # False: no logits; the decoder's input as `head_input` instead
    ) -> ModelOutput:
        """logits: (B, T, V), or (N, V) for the N positions selected by `logits_positions`."""
        out = self.distilbert(input_ids, attention_mask, None, position_ids, output_hidden_states)
        x = out.last_hidden_state
        if logits_positions is not None:
            x = x[logits_positions]
        x = self.lm_ln(self.lm_act(self.lm_dense(x)))
        out.logits, out.head_input = (self.lm_decoder(x), None) if return_logits else (None, x)
        return out


class DistilBertForSequenceClassification(_WithEncoder):
    """classifier(dropout(relu(pre_classifier(h[0])))): (B, num_labels)."""

    task = "sequence-classification"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.cls_dense = nn.Linear(config.dim, config.dim)
        self.cls_dropout = nn.Dropout(config.seq_classif_dropout)
        self.cls_out = nn.Linear(config.dim, config.num_labels)
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.distilbert(input_ids, attention_mask, None, position_ids, output_hidden_states)
        x = torch.relu(self.cls_dense(out.last_hidden_state[:, 0]))
        out.logits = self.cls_out(self.cls_dropout(x))
        return out


class DistilBertForTokenClassification(_WithEncoder):
    task = "token-classification"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.cls_dropout = nn.Dropout(config.dropout)
        self.cls_out = nn.Linear(config.dim, config.num_labels)
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.distilbert(input_ids, attention_mask, None, position_ids, output_hidden_states)
        out.logits = self.cls_out(self.cls_dropout(out.last_hidden_state))  # (B, T, num_labels)
        return out


class DistilBertForQuestionAnswering(_WithEncoder):
    """Extractive QA: logits (B, T, 2); `.start_logits` and `.end_logits` split them."""

    task = "question-answering"

    def __init__(self, config: DistilBertConfig) -> None:
        super().__init__(config)
        self.qa_dropout = nn.Dropout(config.qa_dropout)
        self.qa_out = nn.Linear(config.dim, config.num_labels)  # 2: start, end
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.distilbert(input_ids, attention_mask, None, position_ids, output_hidden_states)
        out.logits = self.qa_out(self.qa_dropout(out.last_hidden_state))
        return out


HEADS: dict[str, type[Pretrained]] = {
    "base": DistilBertModel,
    "masked-lm": DistilBertForMaskedLM,
    "sequence-classification": DistilBertForSequenceClassification,
    "token-classification": DistilBertForTokenClassification,
    "question-answering": DistilBertForQuestionAnswering,
}

# Our keys that belong to one head: a checkpoint of another head lacks them or carries its own.
HEAD_KEYS = ("lm_dense.", "lm_ln.", "lm_decoder.", "cls_dense.", "cls_out.", "qa_out.")


# ----------------------------------------------------------------------------------------------
# Hugging Face key map. Theirs on the left; the "distilbert." prefix may be absent.

_LAYER_PARTS = {  # theirs -> ours, inside transformer.layer.N / layers.N
    "attention.q_lin": "attn.q", "attention.k_lin": "attn.k", "attention.v_lin": "attn.v",
    "attention.out_lin": "attn.out", "sa_layer_norm": "attn_ln", "ffn.lin1": "fc", "ffn.lin2": "proj",
    "output_layer_norm": "mlp_ln",
}
_EMBEDDING_PARTS = {"word_embeddings": "tok", "position_embeddings": "pos", "LayerNorm": "ln"}
_HEAD_PARTS = {"vocab_transform": "lm_dense", "vocab_layer_norm": "lm_ln", "vocab_projector": "lm_decoder",
               "pre_classifier": "cls_dense", "classifier": "cls_out", "qa_outputs": "qa_out"}
_ENCODER_RENAMES = [
    *[(rf"^embeddings\.{theirs}\.", f"embeddings.{ours}.") for theirs, ours in _EMBEDDING_PARTS.items()],
    *[(rf"^transformer\.layer\.(\d+)\.{re.escape(theirs)}\.", rf"layers.\1.{ours}.")
      for theirs, ours in _LAYER_PARTS.items()],
]


def hf_to_ours(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """transformers' DistilBert* state dict -> ours for `task` ("base" is the bare encoder)."""
    out = {}
    for key, tensor in state.items():
        head, _, leaf = key.partition(".")
        if head in _HEAD_PARTS:
            if key == "vocab_projector.weight":
                continue  # tied to the word embeddings
            out[f"{_HEAD_PARTS[head]}.{leaf}"] = tensor
            continue
        name = key.removeprefix("distilbert.")
        if name == "embeddings.position_ids":
            continue  # a buffer older versions saved
        name = _rename(name, _ENCODER_RENAMES)
        out[name if task == "base" else "distilbert." + name] = tensor
    return _stack_qkv(out)


def ours_to_hf(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' layout (DistilBertModel keys unprefixed, heads' encoder under
    distilbert.)."""
    heads = {ours: theirs for theirs, ours in _HEAD_PARTS.items()}
    embeddings = {ours: theirs for theirs, ours in _EMBEDDING_PARTS.items()}
    layer_parts = {ours: theirs for theirs, ours in _LAYER_PARTS.items()}
    prefix = "" if task == "base" else "distilbert."
    out = {}
    for name, tensor in state.items():
        if name == "lm_decoder.weight":
            continue  # tied
        head, _, leaf = name.partition(".")
        if head in heads:
            out[f"{heads[head]}.{leaf}"] = tensor.contiguous()
            continue
        inner = name.removeprefix("distilbert.")
        m = re.match(r"^layers\.(\d+)\.(attn\.qkv|attn\.out|attn_ln|fc|proj|mlp_ln)\.(\w+)$", inner)
        if m is None:
            part, _, leaf = inner.removeprefix("embeddings.").partition(".")
            assert inner.startswith("embeddings.") and part in embeddings, f"no Hugging Face name for {name}"
            out[f"{prefix}embeddings.{embeddings[part]}.{leaf}"] = tensor.contiguous()
            continue
        i, part, leaf = m.groups()
        pieces = zip(("attn.q", "attn.k", "attn.v"), tensor.chunk(3)) if part == "attn.qkv" else [(part, tensor)]
        for piece, t in pieces:
            out[f"{prefix}transformer.layer.{i}.{layer_parts[piece]}.{leaf}"] = t.contiguous()
    return out
