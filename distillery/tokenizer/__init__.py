"""Tokenizers on the `tokenizers` library: byte-level BPE (GPT-2, RoBERTa conventions) and WordPiece (BERT)."""

from distillery.tokenizer.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from distillery.tokenizer.training import train_tokenizer

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "train_tokenizer"]
