"""What to generate and how: one validated dataclass, transformers' argument names and meanings."""

from __future__ import annotations

from dataclasses import dataclass

from distillery.models.common import ConfigError, is_int, is_number

# transformers generates this many new tokens when neither max_length nor max_new_tokens is set.
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass
class GenerationConfig:
    """Decoding settings, validated on creation; every error names the argument and the fix.

    Lengths: `max_new_tokens` wins over `max_length` (prompt + new tokens), as in transformers; with
    neither, 20 new tokens. Sampling (`do_sample=True`) applies, in this order, the repetition penalty,
    `temperature`, `top_k` (0 = off) and `top_p` (1.0 = off), then draws from the softmax;
    `temperature=0` means greedy. Greedy decoding applies only the repetition penalty, then argmax.
    `eos_token_id` (one id or several) ends a row; finished rows are padded with `pad_token_id`
    (by default the first EOS id) until every row has finished.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}.")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            raise ConfigError(f"max_length must be a positive integer, got {self.max_length!r}.")
        if not isinstance(self.do_sample, bool):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r}.")
        if not is_number(self.temperature) or self.temperature < 0:
            raise ConfigError(
                f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}."
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}.")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}.")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(
                f"repetition_penalty must be a finite number > 0 (1 turns it off), got {self.repetition_penalty!r}."
            )
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ConfigError(
                f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}."
            )
        if self.num_return_sequences > 1 and self.greedy:
            raise ConfigError(
                f"num_return_sequences={self.num_return_sequences} needs sampling: greedy decoding (without "
                "beams) returns the same sequence every time; set do_sample=True with a temperature > 0."
            )
        for name, value in (("eos_token_id", self.eos_token_id), ("pad_token_id", self.pad_token_id)):
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(is_int(i) and i >= 0 for i in ids):
                raise ConfigError(f"{name} must be a token id >= 0 (or None), got {value!r}.")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax: no sampling, or sampling at temperature 0."""
        return not self.do_sample or self.temperature == 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def new_tokens_for(self, prompt_length: int) -> int:
        """How many tokens at most to generate after a prompt of `prompt_length` tokens."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            if prompt_length >= self.max_length:
                raise ConfigError(
                    f"The prompt is {prompt_length} tokens long but max_length (prompt + new tokens) is "
                    f"{self.max_length}; raise max_length or set max_new_tokens instead."
                )
            return self.max_length - prompt_length
        return DEFAULT_MAX_NEW_TOKENS


