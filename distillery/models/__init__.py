"""Model families: GPT-2 (causal LM) and the encoders RoBERTa, BERT and DistilBERT (with task heads)."""

from distillery.models.bert import (
    BERT_PRESETS,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from distillery.models.checkpoint import build_model, load_model, preset_config, save_pretrained
from distillery.models.common import ConfigError, DistilleryError, KVCache, ModelOutput
from distillery.models.distilbert import (
    DISTILBERT_PRESETS,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
)
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
    "RobertaForQuestionAnswering", "BertConfig", "BERT_PRESETS", "BertModel", "BertForMaskedLM",
    "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
    "DistilBertConfig", "DISTILBERT_PRESETS", "DistilBertModel", "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification", "DistilBertForTokenClassification",
    "DistilBertForQuestionAnswering", "KVCache", "ModelOutput", "ConfigError", "DistilleryError",
    "build_model", "load_model", "preset_config", "save_pretrained",
]
