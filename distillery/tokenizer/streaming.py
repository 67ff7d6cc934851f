"""Streaming decode: text for each new token as soon as it forms whole characters.

A byte-level BPE token is a run of bytes, and one character (an emoji, a CJK ideograph) can span
several tokens. Each token is turned back into its bytes, and Python's incremental UTF-8 decoder
holds back an incomplete character until its last byte arrives. With errors="replace" it yields
exactly what decoding all the bytes at once yields, so the pieces concatenate to `decode(ids)`.

A WordPiece token is whole characters. The WordPiece decoder turns each token into its piece of
text on its own (a `##` piece is glued on, any other gets a space before it, and the clean-up
drops the space before punctuation), with one exception: the first token gets no space. So the
text a token adds is decode(previous, token) minus decode(previous), asked of the library's
decoder, and the pieces again concatenate to `decode(ids)`.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distillery.tokenizer.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, char -> byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (control characters, space, …) for the code points 256, 257, … in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


def token_bytes(token: str) -> bytes:
    """The bytes a vocabulary string stands for; an added token outside the alphabet is its own
    UTF-8 text (the rule of the tokenizers library's ByteLevel decoder)."""
    alphabet = byte_level_alphabet()
    if all(c in alphabet for c in token):
        return bytes(alphabet[c] for c in token)
    return token.encode("utf-8")


class IncrementalDecoder:
    """Feed ids one at a time with `add`; each call returns the text that became complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes: dict[int, bytes] = {}

    def add(self, token_id: int) -> str:
        """The new text after `token_id` ("" while a multi-byte character is incomplete)."""
        token_id = int(token_id)
        if token_id in self.skip:
            return ""
        piece = self._bytes.get(token_id)
        if piece is None:
            token = self.tokenizer.backend.id_to_token(token_id)
            if token is None:
                raise IndexError(f"token id {token_id} is outside the vocabulary of {self.tokenizer.vocab_size}")
            piece = self._bytes[token_id] = token_bytes(token)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """What is held back at the end of the stream (U+FFFD for an incomplete character)."""
        return self._utf8.decode(b"", final=True)


class WordPieceIncrementalDecoder:
    """`IncrementalDecoder` for WordPiece vocabularies: `add` returns each token's text at once."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self._previous: str | None = None  # the last token given out, None before the first

    def add(self, token_id: int) -> str:
        """The text `token_id` adds (with the space before it, where the decoder puts one)."""
        token_id = int(token_id)
        if token_id in self.skip:
            return ""
        token = self.tokenizer.backend.id_to_token(token_id)
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.tokenizer.vocab_size}")
        decoder = self.tokenizer.backend.decoder
        if self._previous is None:
            piece = decoder.decode([token])
        else:
            piece = decoder.decode([self._previous, token])[len(decoder.decode([self._previous])):]
        self._previous = token
        return piece

    def flush(self) -> str:
        """Nothing is ever held back: a WordPiece token is whole characters."""
        return ""
