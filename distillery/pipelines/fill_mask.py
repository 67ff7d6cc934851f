"""Fill-mask: the most likely tokens for each mask token in a text, as transformers' fill-mask pipeline.

Any masked LM runs it: RoBERTa (`<mask>`), BERT and DistilBERT (`[MASK]`); the mask token is the
tokenizer's. Only the mask positions go through the LM head (`logits_positions=...`): the head's
decoder is a (C x V) matrix, so skipping it for every other token is most of the saving over
transformers on short texts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from distillery.models.common import DistilleryError, Pretrained

logger = logging.getLogger(__name__)

Prediction = dict[str, Any]  # {"score": float, "token": int, "token_str": str, "sequence": str}


class FillMaskPipeline:
    """Predict the token behind each mask token of one text or a list of texts, with any masked LM.

    >>> unmasker = FillMaskPipeline(load_model("distilroberta-base"), load_tokenizer("distilroberta-base"))
    >>> unmasker("Hello I'm a <mask> model.", top_k=2)
    [{'score': ..., 'token': 265, 'token_str': ' business', 'sequence': "Hello I'm a business model."}, ...]

    A list of texts runs `batch_size` texts per forward pass, right-padded to the longest.
    """

    def __init__(self, model: Pretrained, tokenizer, batch_size: int = 8) -> None:
        if model.task != "masked-lm":
            use = ("use text-generation for GPT-2 models" if model.family == "gpt2" else
                   "load a checkpoint with a masked-LM head (…ForMaskedLM)")
            raise DistilleryError(
                f"fill-mask needs a masked language model (RoBERTa, BERT or DistilBERT with an MLM head), but "
                f"this is a {model.family} {model.task} model; {use}."
            )
        if tokenizer.mask_token_id is None:
            raise DistilleryError(
                f"The {tokenizer.style} tokenizer has no mask token, so it cannot be used for fill-mask; "
                "use the tokenizer saved with the masked language model."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def __call__(
        self,
        inputs: str | list[str],
        top_k: int = 5,
        targets: str | list[str] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
    ) -> list[Prediction] | list[list[Prediction]] | list[Any]:
        """Top-k predictions for each mask: a list of dicts per mask; a list of those per mask when a
        text has several masks; a list of per-text results when `inputs` is a list.

        `targets` limits the candidates to these tokens (a word not in the vocabulary is replaced by
        its first token, as transformers does). `tokenizer_kwargs` may hold `truncation` and
        `max_length`.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise DistilleryError(f"fill-mask top_k must be a positive integer, got {top_k!r}.")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise DistilleryError("fill-mask takes a text or a non-empty list of texts.")
        target_ids = self.target_ids(targets) if targets is not None else None
        encodings = [self._encode(text, tokenizer_kwargs or {}) for text in texts]
        results = []
        for start in range(0, len(encodings), self.batch_size):
            results.extend(self._predict(encodings[start:start + self.batch_size], top_k, target_ids))
        # As transformers: a one-element list gives that element's result, not a list of one.
        return results[0] if isinstance(inputs, str) or len(results) == 1 else results

    def target_ids(self, targets: str | list[str]) -> list[int]:
        """Token ids of `targets`: a vocabulary entry as is, any other word by its first token."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        ids: list[int] = []
        for target in targets:
            token_id = self.tokenizer.backend.token_to_id(target)
            if token_id is None:
                pieces = self.tokenizer.encode(target, add_special_tokens=False)
                if not pieces:
                    logger.warning("fill-mask target %r is not in the vocabulary and encodes to nothing; "
                                   "ignoring it.", target)
                    continue
                token_id = pieces[0]
                logger.warning("fill-mask target %r is not in the vocabulary; using its first token %r.",
                               target, self.tokenizer.convert_ids_to_tokens([token_id])[0])
            if token_id not in ids:
                ids.append(token_id)
        if not ids:
            raise DistilleryError(f"None of the fill-mask targets {targets!r} can be encoded; pass words "
                                  "or vocabulary tokens.")
        return ids

    def _encode(self, text: str, tokenizer_kwargs: dict[str, Any]) -> list[int]:
        unknown = set(tokenizer_kwargs) - {"truncation", "max_length"}
        if unknown:
            raise DistilleryError(f"fill-mask tokenizer_kwargs accepts truncation and max_length, not "
                                  f"{sorted(unknown)}.")
        limit = self.model.config.max_tokens
        if tokenizer_kwargs.get("truncation"):
            max_length = min(tokenizer_kwargs.get("max_length") or limit, limit)
            ids = self.tokenizer([text], truncation=True, max_length=max_length)["input_ids"][0].tolist()
        else:
            ids = self.tokenizer.encode(text)
        if len(ids) > limit:
            raise DistilleryError(
                f"The fill-mask text is {len(ids)} tokens long but the model takes at most {limit}; shorten it "
                "or pass tokenizer_kwargs={'truncation': True} (--truncation on the command line)."
            )
        if self.tokenizer.mask_token_id not in ids:
            preview = text if len(text) <= 60 else text[:57] + "..."
            raise DistilleryError(
                f"No mask token ({self.tokenizer.mask_token}) in the fill-mask text {preview!r}; put "
                f"{self.tokenizer.mask_token} where the word to predict goes."
            )
        return ids

    @torch.inference_mode()
    def _predict(self, batch: list[list[int]], top_k: int, target_ids: list[int] | None) -> list[Any]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        is_mask = input_ids == self.tokenizer.mask_token_id
        device = self.model.device
        logits = self.model(input_ids.to(device), attention_mask.to(device),
                            logits_positions=is_mask.to(device)).logits  # (N masks, V), row-major order
        probs = logits.float().softmax(dim=-1).cpu()
        if target_ids is not None:
            probs = probs[:, target_ids]
        scores, choices = probs.topk(min(top_k, probs.size(-1)))
        if target_ids is not None:
            choices = torch.tensor(target_ids)[choices]

        results = []
        first = 0
        for row, ids in enumerate(batch):
            positions = is_mask[row].nonzero().flatten().tolist()
            rows = range(first, first + len(positions))
            first += len(positions)
            per_mask = [self._propositions(ids, pos, scores[i].tolist(), choices[i].tolist(), len(positions) == 1)
                        for pos, i in zip(positions, rows)]
            results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results

    def _propositions(self, ids: list[int], position: int, scores: list[float], choices: list[int],
                      single_mask: bool) -> list[Prediction]:
        out = []
        for score, token in zip(scores, choices):
            filled = [token if i == position else t for i, t in enumerate(ids)]
            filled = [t for t in filled if t != self.tokenizer.pad_token_id]
            # Several masks: keep special tokens, so that the other masks stay visible (as transformers).
            sequence = self.tokenizer.decode(filled, skip_special_tokens=single_mask)
            out.append({"score": score, "token": token, "token_str": self.tokenizer.decode([token]),
                        "sequence": sequence})
        return out

