"""Model families: GPT-2 (causal LM) and RoBERTa (encoder with task heads)."""

from distillery.models.checkpoint import build_model, load_model, save_pretrained
from distillery.models.common import ConfigError, DistilleryError, KVCache, ModelOutput
from distillery.models.gpt2 import GPT2, GPT2_PRESETS, GPT2Config
from distillery.models.roberta import (
    ROBERTA_PRESETS,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)

__all__ = [
    "GPT2", "GPT2Config", "GPT2_PRESETS", "RobertaConfig", "ROBERTA_PRESETS", "RobertaModel",
    "RobertaForMaskedLM", "RobertaForSequenceClassification", "RobertaForTokenClassification",
    "RobertaForQuestionAnswering", "KVCache", "ModelOutput", "ConfigError", "DistilleryError",
    "build_model", "load_model", "save_pretrained",
]
