"""Feature extraction: one hidden vector per token, as transformers' feature-extraction pipeline.

The features are the base model's last hidden state: for GPT-2 after the final LayerNorm (what
transformers' GPT2Model returns), for the encoders (RoBERTa, BERT, DistilBERT) the encoder's output
(a head model's encoder is used and its head skipped, as transformers loads AutoModel).
"""

from __future__ import annotations

from typing import Any

import torch

from distillery.models.common import DistilleryError, Pretrained
from distillery.models.gpt2 import GPT2

FAMILIES = ("gpt2", "roberta", "bert", "distilbert")


class FeatureExtractionPipeline:
    """Hidden states of a text: a nested list of shape (1, T, C) per text, or tensors when asked.

    >>> extractor = FeatureExtractionPipeline(load_model("distilgpt2"), load_tokenizer("distilgpt2"))
    >>> features = extractor("Replace me by any text you'd like.")  # [[[...768 floats...], ...]]
    """

    def __init__(self, model: Pretrained, tokenizer) -> None:
        if model.family not in FAMILIES:
            raise DistilleryError(f"feature-extraction runs {', '.join(FAMILIES)} models, not {model.family!r}.")
        self.model = model.eval()
        self.tokenizer = tokenizer

    def __call__(
        self,
        inputs: str | list[str],
        truncation: bool | None = None,
        tokenize_kwargs: dict[str, Any] | None = None,
        return_tensors: bool = False,
    ) -> list[Any] | torch.Tensor:
        """Features of one text (nested lists (1, T, C)) or of a list of texts (a list of those).

        `truncation` (or tokenize_kwargs={"truncation": True, "max_length": n}) shortens texts longer
        than the model's positions instead of refusing them; `return_tensors` gives (1, T, C) tensors.
        """
        kwargs = dict(tokenize_kwargs or {})
        if truncation is not None:
            if "truncation" in kwargs:
                raise DistilleryError("feature-extraction got truncation both as an argument and in "
                                      "tokenize_kwargs; pass it once.")
            kwargs["truncation"] = truncation
        unknown = set(kwargs) - {"truncation", "max_length"}
        if unknown:
            raise DistilleryError(f"feature-extraction tokenize_kwargs accepts truncation and max_length, not "
                                  f"{sorted(unknown)}.")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DistilleryError("feature-extraction takes a text or a non-empty list of texts.")
        features = [self._features(text, kwargs) for text in texts]
        if not return_tensors:
            features = [f.tolist() for f in features]
        return features[0] if isinstance(inputs, str) else features

    @property
    def max_tokens(self) -> int:
        config = self.model.config
        return config.n_positions if isinstance(self.model, GPT2) else config.max_tokens

    def _features(self, text: str, kwargs: dict[str, Any]) -> torch.Tensor:
        limit = self.max_tokens
        if kwargs.get("truncation"):
            max_length = min(kwargs.get("max_length") or limit, limit)
            ids = self.tokenizer([text], truncation=True, max_length=max_length)["input_ids"][0].tolist()
        else:
            ids = self.tokenizer.encode(text)
        if len(ids) > limit:
            raise DistilleryError(
                f"The text is {len(ids)} tokens long but the model takes at most {limit}; shorten it or pass "
                "truncation=True (--truncation on the command line)."
            )
        if not ids:
            raise DistilleryError("The text encodes to no tokens; feature-extraction needs at least one.")
        return self.hidden_states(torch.tensor([ids], device=self.model.device)).float().cpu()

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, C) last hidden states of the base model."""
        if isinstance(self.model, GPT2):
            # logits_to_keep=1: the LM head is not part of the features; compute it for one position only.
            return self.model(input_ids, logits_to_keep=1).last_hidden_state
        # A head model holds its encoder under the family's name (.roberta, .bert, .distilbert).
        encoder = getattr(self.model, self.model.family, self.model)
        return encoder(input_ids).last_hidden_state
