"""Byte-level BPE tokenizers (GPT-2 and RoBERTa conventions) on the `tokenizers` library."""

from distillery.tokenizer.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from distillery.tokenizer.training import train_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer"]
