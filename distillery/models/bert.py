"""BERT family encoder and its task heads in plain PyTorch.

Reads top to bottom: config -> embeddings -> encoder -> heads -> key map.
Shapes: B (batch), T (tokens), C (hidden size), V (vocabulary).

BERT is RoBERTa's parent, and the two differ only at the edges, so the layer itself (post-LayerNorm,
exact erf GELU, query/key/value stacked into one `attn.qkv`) and the encoder's Hugging Face key
names are RoBERTa's, imported from `roberta.py`. What is BERT's own: positions numbered from 0
whatever the padding (transformers counts left pads too), two token types (sentence A / B), a
pooler that the sequence-classification head uses (tanh(dense(h[CLS]))), an MLM head stored
under `cls.predictions` whose decoder is tied to the word embeddings and keeps its own bias, and
the next-sentence head of pre-training checkpoints, which no task here uses and is dropped.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distillery.models.common import ConfigError, ModelOutput, Pretrained, activation_fn
from distillery.models.roberta import (
    _ENCODER_RENAMES,
    Layer,
    _encoder_to_hf,
    _rename,
    _stack_qkv,
    init_weights,
)

# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    classifier_dropout: float | None = None
    # Label names for classification heads ({"0": "NEGATIVE", ...} in config.json).
    id2label: dict[int, str] = field(default_factory=lambda: {0: "LABEL_0", 1: "LABEL_1"})
    problem_type: str | None = None  # "regression" for STS-B style heads
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "bert"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"BertConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})."
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"BertConfig.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size "
                f"({self.vocab_size}), or null."
            )
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        if not self.id2label:
            raise ConfigError("BertConfig.id2label must name at least one label.")
        activation_fn(self.hidden_act)

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_tokens(self) -> int:
        """Longest input: one learned position per token, from 0."""
        return self.max_position_embeddings

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BertConfig:
        if name not in BERT_PRESETS:
            raise ConfigError(f"Unknown BERT preset {name!r}; choose one of {sorted(BERT_PRESETS)}.")
        return cls(**{**BERT_PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """Build from a Hugging Face config.json dict; unknown keys are kept in `extra`."""
        unsupported = {"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False}
        for key, default in unsupported.items():
            if hf.get(key, default) != default:
                raise ConfigError(
                    f"config.json sets {key}={hf[key]!r}, which distillery's BERT does not support "
                    f"(only {default!r})."
                )
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        known = {k: v for k, v in hf.items() if k in names}
        if "num_labels" in hf and "id2label" not in hf:
            known["id2label"] = {i: f"LABEL_{i}" for i in range(int(hf["num_labels"]))}
        extra = {k: v for k, v in hf.items() if k not in names and k not in _HF_DERIVED_KEYS}
        return cls(**known, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = {v: k for k, v in self.id2label.items()}
        out.update(self.extra)
        out["model_type"] = "bert"
        return out


# config.json keys that are re-derived on save rather than carried over.
_HF_DERIVED_KEYS = {"model_type", "num_labels", "label2id", "architectures", "torch_dtype", "dtype",
                    "transformers_version"}

BERT_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768,
                              intermediate_size=3072),
    "bert-large-uncased": dict(num_hidden_layers=24, num_attention_heads=16, hidden_size=1024,
                               intermediate_size=4096),
    # sentence-transformers/all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased): 12 heads of 32.
    "all-MiniLM-L6-v2": dict(num_hidden_layers=6, num_attention_heads=12, hidden_size=384,
                             intermediate_size=1536),
}


# ----------------------------------------------------------------------------------------------
# Encoder


class Embeddings(nn.Module):
    """word + position (0, 1, 2, ...) + token type, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.pos = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        T = input_ids.size(1)
        # Positions count every slot, pads included (as transformers does for BERT): (1, T) broadcasts.
        pos = self.pos.weight[:T] if position_ids is None else self.pos(position_ids)
        x = self.tok(input_ids) + pos
        if token_type_ids is None:
            x = x + self.token_type.weight[0]  # all sentence A
        else:
            x = x + self.token_type(token_type_ids)
        x = self.ln(x)
        return self.dropout(x) if self.training else x


class BertModel(Pretrained):
    """The bare encoder (transformers' BertModel); `pooler` only when add_pooling_layer."""

    family = "bert"
    task = "base"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        init_weights(self, config)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T): 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # (B, T): 0 = sentence A, 1 = sentence B
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """last_hidden_state (B, T, C); hidden_states: embeddings, then each layer's output."""
        T = input_ids.size(1)
        if T > self.config.max_tokens:
            raise ValueError(
                f"The input is {T} tokens long but the model takes at most {self.config.max_tokens}; "
                "shorten the text or pass truncation=True."
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that may be seen
        x = self.embeddings(input_ids, token_type_ids, position_ids)
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

    def pooled(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """tanh(dense([CLS])): transformers' pooler_output, (B, C)."""
        assert self.pooler is not None, "this encoder was built without a pooling layer"
        return torch.tanh(self.pooler(last_hidden_state[:, 0]))


# ----------------------------------------------------------------------------------------------
# Heads. Each holds the encoder as `.bert` and calls it first.


class _WithEncoder(Pretrained):
    family = "bert"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=add_pooling_layer)

    def _dropout_p(self) -> float:
        c = self.config
        return c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob


class BertForMaskedLM(_WithEncoder):
    """logits = decoder(LayerNorm(act(dense(h)))), decoder weight = the word embeddings."""

    task = "masked-lm"
    vocabulary_head = "lm_decoder"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        C = config.hidden_size
        self.lm_dense = nn.Linear(C, C)
        self.lm_act = activation_fn(config.hidden_act)
        self.lm_ln = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.lm_decoder = nn.Linear(C, config.vocab_size)  # weight tied to the word embeddings
        init_weights(self, config)
        self.lm_decoder.weight = self.bert.embeddings.tok.weight

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
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        x = out.last_hidden_state
        if logits_positions is not None:
            x = x[logits_positions]
        x = self.lm_ln(self.lm_act(self.lm_dense(x)))
        out.logits, out.head_input = (self.lm_decoder(x), None) if return_logits else (None, x)
        return out


class BertForSequenceClassification(_WithEncoder):
    """classifier(dropout(pooler([CLS]))): (B, num_labels); one output is a regression score."""

    task = "sequence-classification"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=True)
        self.cls_dropout = nn.Dropout(self._dropout_p())
        self.cls_out = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        out.logits = self.cls_out(self.cls_dropout(self.bert.pooled(out.last_hidden_state)))
        return out


class BertForTokenClassification(_WithEncoder):
    task = "token-classification"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.cls_dropout = nn.Dropout(self._dropout_p())
        self.cls_out = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        out.logits = self.cls_out(self.cls_dropout(out.last_hidden_state))  # (B, T, num_labels)
        return out


class BertForQuestionAnswering(_WithEncoder):
    """Extractive QA: logits (B, T, 2); `.start_logits` and `.end_logits` split them."""

    task = "question-answering"

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.qa_out = nn.Linear(config.hidden_size, config.num_labels)  # 2: start, end
        init_weights(self, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool = False) -> ModelOutput:
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states)
        out.logits = self.qa_out(out.last_hidden_state)
        return out


HEADS: dict[str, type[Pretrained]] = {
    "base": BertModel,
    "masked-lm": BertForMaskedLM,
    "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification,
    "question-answering": BertForQuestionAnswering,
}

# Our keys that belong to one head rather than the encoder: a checkpoint of another head lacks
# them (they are initialised afresh) or carries its own (dropped). The pooler counts, as in
# transformers: only the bare encoder and sequence classification have one.
HEAD_KEYS = ("lm_dense.", "lm_ln.", "lm_decoder.", "cls_out.", "qa_out.", "pooler.", "bert.pooler.")


# ----------------------------------------------------------------------------------------------
# Hugging Face key map. The encoder's names are RoBERTa's; "bert." prefixes may be absent (a bare
# BertModel, as sentence-transformers saves it).

_HEAD_RENAMES = [
    (r"^cls\.predictions\.transform\.dense\.", "lm_dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "lm_ln."),
    (r"^cls\.predictions\.decoder\.bias$", "lm_decoder.bias"),
    (r"^cls\.predictions\.bias$", "lm_decoder.bias"),
    (r"^classifier\.", "cls_out."),
    (r"^qa_outputs\.", "qa_out."),
]
_HF_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_POOLED_TASKS = ("base", "sequence-classification")


def hf_to_ours(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """transformers' Bert* state dict -> ours for `task` ("base" is the bare encoder)."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(("cls.", "classifier.", "qa_outputs.")):
            if key == "cls.predictions.decoder.weight" or key.startswith("cls.seq_relationship."):
                continue  # tied to the word embeddings; the next-sentence head of pre-training
            if key == "cls.predictions.decoder.bias" and "cls.predictions.bias" in state:
                continue  # the same tensor, saved twice by older versions
            out[_rename(key, _HEAD_RENAMES)] = tensor
            continue
        name = key.removeprefix("bert.")
        if name.endswith(_HF_BUFFERS):
            continue
        if task not in _POOLED_TASKS and name.startswith("pooler."):
            continue  # these heads have no pooler (transformers drops it too)
        name = _rename(name, _ENCODER_RENAMES)
        out[name if task == "base" else "bert." + name] = tensor
    return _stack_qkv(out)


def ours_to_hf(state: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers' layout (BertModel keys unprefixed, heads' encoder under bert.)."""
    heads = {"lm_dense.": "cls.predictions.transform.dense.", "lm_ln.": "cls.predictions.transform.LayerNorm.",
             "cls_out.": "classifier.", "qa_out.": "qa_outputs."}
    out = {}
    for name, tensor in state.items():
        if name == "lm_decoder.weight":
            continue  # tied
        if name == "lm_decoder.bias":
            out["cls.predictions.bias"] = tensor.contiguous()
        elif name.startswith(tuple(heads)):
            ours = next(p for p in heads if name.startswith(p))
            out[heads[ours] + name[len(ours):]] = tensor.contiguous()
        else:
            inner = name.removeprefix("bert.")
            prefix = "" if task == "base" else "bert."
            m = re.match(r"^(layers\.\d+\.attn\.)qkv\.(\w+)$", inner)
            pieces = ([(f"{m.group(1)}{p}.{m.group(2)}", t) for p, t in zip("qkv", tensor.chunk(3))]
                      if m else [(inner, tensor)])
            for piece, t in pieces:
                out[prefix + _encoder_to_hf(piece)] = t.contiguous()
    return out
