"""Byte-level BPE tokenizers with GPT-2's and RoBERTa's conventions, on the `tokenizers` library.

A folder holds either tokenizer.json (used as written) or vocab.json + merges.txt, from which the
conventions of its style rebuild what the files do not say:

- gpt2: no prefix space, nothing added around a text, `<|endoftext|>` a special token (50256).
- roberta: `<s> A </s>` and `<s> A </s></s> B </s>`, ids <s>=0 <pad>=1 </s>=2 <unk>=3, and
  `<mask>` a special token that absorbs the space before it ("a <mask>" -> "a", "<mask>").

The style comes from tokenizer_config.json (tokenizer_class) or config.json (model_type) when
present, else from the vocabulary (RoBERTa's has `<s>` and `<mask>`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from distillery.models.common import DistilleryError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MODEL_CONFIG_FILE = "config.json"

STYLES = ("gpt2", "roberta")
TOKENIZER_CLASSES = {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer"}
# tokenizer_class / model_type values that name a style.
STYLE_NAMES = {
    "GPT2Tokenizer": "gpt2", "GPT2TokenizerFast": "gpt2", "gpt2": "gpt2",
    "RobertaTokenizer": "roberta", "RobertaTokenizerFast": "roberta", "roberta": "roberta",
}
# The special tokens of each style, and the positions the real models were trained with.
STYLE_SPECIAL_TOKENS: dict[str, dict[str, str | None]] = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": None, "mask_token": None},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>"},
}
STYLE_MAX_LENGTH = {"gpt2": 1024, "roberta": 512}
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")


class TokenizerError(DistilleryError):
    """A tokenizer folder, file or argument that cannot be used."""


class Tokenizer:
    """A byte-level BPE tokenizer: the `tokenizers` backend plus the style's special tokens.

    `backend` is the `tokenizers.Tokenizer` doing the work; this class adds transformers' call
    conventions (padding, truncation, tensors), saving in transformers' layout, streaming decode
    and a fingerprint that data shards and checkpoints record.
    """

    def __init__(self, backend: tokenizers.Tokenizer, style: str, special_tokens: dict[str, str | None],
                 model_max_length: int | None = None):
        assert style in STYLES, style
        self.backend = backend
        self.style = style
        self.model_max_length = model_max_length
        # Truncation and padding are set on the backend for one call at a time (as transformers
        # does); the lock keeps concurrent callers from seeing each other's settings.
        self._lock = threading.Lock()
        self._fingerprint: tuple[int, str] | None = None
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token, self.eos_token, self.unk_token, self.pad_token, self.mask_token = (
            special_tokens.get(key) for key in SPECIAL_TOKEN_KEYS)
        for key in SPECIAL_TOKEN_KEYS:
            token = special_tokens.get(key)
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"The {key} {token!r} is not in the tokenizer's vocabulary; fix the "
                                     f"{key} in {TOKENIZER_CONFIG_FILE} or the vocabulary.")
        self._special_ids = sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # -- attributes ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def mask_token_id(self) -> int | None:
        return self._id(self.mask_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special added tokens (`skip_special_tokens` drops exactly these)."""
        return list(self._special_ids)

    def __repr__(self) -> str:
        return f"Tokenizer(style={self.style!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text; RoBERTa adds `<s> … </s>` when `add_special_tokens`, GPT-2 adds nothing."""
        _check_texts([text])
        with self._lock:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Ids of many texts, encoded in parallel on all cores by the tokenizers library."""
        _check_texts(texts)
        with self._lock:
            return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def __call__(self, texts: str | list[str], text_pair: str | list[str] | None = None,
                 padding: bool | str = False, truncation: bool | str = False, max_length: int | None = None,
                 padding_side: str = "right", return_tensors: str | None = "pt",
                 add_special_tokens: bool = True) -> dict[str, Any]:
        """`input_ids` and `attention_mask` for a text or a batch, with transformers' argument names.

        padding: False, True / "longest" (to the longest in the batch) or "max_length". Where the
        tokenizer has no pad token (GPT-2), pads use the eos id; the attention mask marks them.
        truncation: False, True / "longest_first", "only_first" or "only_second", to `max_length`
        (default `model_max_length`), special tokens included.
        return_tensors: "pt" for (B, T) int64 tensors, None for lists (unbatched for one str).
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        _check_texts(batch)
        if pairs is not None:
            _check_texts(pairs)
            if len(pairs) != len(batch):
                raise TokenizerError(f"text_pair has {len(pairs)} texts but texts has {len(batch)}; pass one "
                                     "pair per text.")
        if return_tensors not in ("pt", None):
            raise TokenizerError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None.")
        if padding_side not in ("right", "left"):
            raise TokenizerError(f"padding_side={padding_side!r} must be 'right' or 'left'.")
        padding = {True: "longest", False: None, "do_not_pad": None}.get(padding, padding)
        if padding not in (None, "longest", "max_length"):
            raise TokenizerError(f"padding={padding!r} must be False, True, 'longest' or 'max_length'.")
        truncation = {True: "longest_first", False: None, "do_not_truncate": None}.get(truncation, truncation)
        if truncation not in (None, *TRUNCATION_STRATEGIES):
            raise TokenizerError(f"truncation={truncation!r} must be False, True or one of {TRUNCATION_STRATEGIES}.")
        limit = max_length if max_length is not None else self.model_max_length
        if (truncation or padding == "max_length") and limit is None:
            raise TokenizerError("Truncation or padding to max_length needs max_length; pass max_length=N.")

        pad_id = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        if padding and pad_id is None:
            raise TokenizerError("This tokenizer has neither a pad nor an eos token to pad with; set pad_token in "
                                 f"{TOKENIZER_CONFIG_FILE}.")
        with self._lock:
            try:
                if truncation:
                    self.backend.enable_truncation(limit, strategy=truncation)
                if padding:
                    self.backend.enable_padding(direction=padding_side, pad_id=pad_id,
                                                pad_token=self.backend.id_to_token(pad_id),
                                                length=limit if padding == "max_length" else None)
                inputs = batch if pairs is None else list(zip(batch, pairs, strict=True))
                encodings = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as e:  # noqa: BLE001 - the library's messages name the bad setting
                raise TokenizerError(f"The tokenizer could not encode this batch: {e}.") from e
            finally:
                self.backend.no_truncation()
                self.backend.no_padding()
        input_ids = [e.ids for e in encodings]
        attention_mask = [e.attention_mask for e in encodings]
        if return_tensors is None:
            return {"input_ids": input_ids[0] if single else input_ids,
                    "attention_mask": attention_mask[0] if single else attention_mask}
        import torch

        if len({len(ids) for ids in input_ids}) > 1:
            raise TokenizerError("The texts have different lengths, so they cannot form one tensor; pass "
                                 "padding=True.")
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "attention_mask": torch.tensor(attention_mask, dtype=torch.long)}

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD, as transformers' errors="replace").

        transformers 5.23 defaults to no clean-up for GPT-2 and RoBERTa, and its pipelines do not
        ask for it (it even ignores a request for it on BPE tokenizers, where it would glue real
        spaces to punctuation). Passing True here applies transformers' classic clean-up (" ." ->
        ".", " n't" -> "n't", …), for output meant to match older transformers releases.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:
        """`decode` for each sequence."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        """The vocabulary strings (byte-level, spaces as "Ġ") of one id or a list of ids."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """The ids of vocabulary strings (None for a string that is not in the vocabulary)."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def incremental_decoder(self, skip_special_tokens: bool = False):
        """A decoder for streaming: `.add(id)` returns the new text, never half a character."""
        from distillery.tokenizer.streaming import IncrementalDecoder

        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- identity and saving ------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 of what decides the ids: vocabulary, merges, added tokens and their flags, style.

        Stable across processes and tokenizers releases (merges are normalised to pairs), so data
        prepared with one tokenizer can be checked against a model's.
        """
        # Cached (serialising a 50k vocabulary takes a while), keyed on the size so that tokens
        # added to the backend later are noticed.
        size = self.vocab_size
        if self._fingerprint is None or self._fingerprint[0] != size:
            self._fingerprint = (size, self._compute_fingerprint())
        return self._fingerprint[1]

    def _compute_fingerprint(self) -> str:
        state = json.loads(self.backend.to_str())
        model = state["model"]
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        added = sorted((t["id"], t["content"], bool(t["special"]), bool(t["lstrip"]), bool(t["rstrip"]))
                       for t in state.get("added_tokens", []))
        canonical = {"style": self.style, "vocab": sorted(model["vocab"].items(), key=lambda kv: kv[1]),
                     "merges": merges, "added_tokens": added,
                     "special_tokens": {k: getattr(self, k) for k in SPECIAL_TOKEN_KEYS}}
        blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json,
        each written atomically, in the layout transformers' AutoTokenizer loads."""
        from distillery.models.checkpoint import atomic_write, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        serialized = self.backend.to_str(pretty=True)
        state = json.loads(serialized)
        with atomic_write(directory / TOKENIZER_FILE, "w") as f:
            f.write(serialized)
        vocab = dict(sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1]))
        with atomic_write(directory / VOCAB_FILE, "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
        with atomic_write(directory / MERGES_FILE, "w") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        special_map = self._special_tokens_map(state)
        write_json(directory / SPECIAL_TOKENS_MAP_FILE, special_map)
        write_json(directory / TOKENIZER_CONFIG_FILE, self._tokenizer_config(state))
        return directory

    def _special_tokens_map(self, state: dict[str, Any]) -> dict[str, Any]:
        added = {t["content"]: t for t in state.get("added_tokens", [])}
        tokens: dict[str, Any] = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
            if token is None:
                continue
            entry = added.get(token)
            # A token with non-default matching (RoBERTa's <mask> eats the space before it) keeps
            # its flags, so that transformers rebuilds it the same way.
            tokens[key] = token if entry is None or not (entry["lstrip"] or entry["rstrip"]) else {
                k: entry[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word")}
        if self.style == "roberta":
            tokens["cls_token"], tokens["sep_token"] = tokens.get("bos_token"), tokens.get("eos_token")
        return tokens

    def _tokenizer_config(self, state: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": TOKENIZER_CLASSES[self.style],
            "model_max_length": self.model_max_length or STYLE_MAX_LENGTH[self.style],
            "add_prefix_space": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                  "special")}
                for t in state.get("added_tokens", [])},
        }
        if self.style == "gpt2":
            config["add_bos_token"] = False
        else:
            config["trim_offsets"] = True
        for key, value in self._special_tokens_map(state).items():
            config[key] = value if isinstance(value, str) else value["content"]
        return config


def clean_up_tokenization(text: str) -> str:
    """transformers' classic clean-up: drop the space before punctuation and English contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def _check_texts(texts: list[Any]) -> None:
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"The tokenizer takes str texts, not {type(text).__name__}; decode bytes "
                                 "to str first.")


# ----------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model folder or hub id: tokenizer.json, else vocab.json + merges.txt.

    The style (gpt2 or roberta) comes from tokenizer_config.json / config.json when present,
    else from the vocabulary; see this module's docstring for what each style adds.
    """
    from distillery.models.checkpoint import resolve_model_dir

    directory = resolve_model_dir(name_or_path)
    tokenizer_config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
    model_config = _read_json(directory / MODEL_CONFIG_FILE)
    if (directory / TOKENIZER_FILE).is_file():
        backend = _read_backend(directory / TOKENIZER_FILE)
    elif (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file():
        backend = None
    else:
        raise TokenizerError(f"{directory} has no {TOKENIZER_FILE} and no {VOCAB_FILE} + {MERGES_FILE}; pass a "
                             "folder that holds the tokenizer files (save them with save_pretrained).")
    if backend is None:
        bpe = _read_bpe(directory)
        style = _style(tokenizer_config, model_config, bpe.token_to_id)
        backend = build_backend(bpe, style)
    else:
        style = _style(tokenizer_config, model_config, backend.token_to_id)
    special_tokens = dict(STYLE_SPECIAL_TOKENS[style])
    for key in SPECIAL_TOKEN_KEYS:
        for source in (special_map, tokenizer_config):
            if key in source:
                value = source[key]
                special_tokens[key] = value.get("content") if isinstance(value, dict) else value
                break
    return Tokenizer(backend, style, special_tokens, _model_max_length(style, tokenizer_config, model_config))


def build_backend(bpe: BPE, style: str) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` around a byte-level BPE model with the conventions of `style`."""
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if style == "gpt2":
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    else:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in ("<s>", "<pad>", "</s>", "<unk>")])
        # lstrip: "a <mask>" is "a" + "<mask>", the way RoBERTa was pre-trained.
        backend.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
        backend.post_processor = processors.RobertaProcessing(
            ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False)
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix or re-create it.") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object.")
    return value


def _read_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for any bad file
        raise TokenizerError(f"{path} is not a tokenizer file the tokenizers library can read ({e}); "
                             "re-create it with save_pretrained.") from e
    if not isinstance(backend.model, BPE) or not isinstance(backend.decoder, decoders.ByteLevel):
        raise TokenizerError(f"{path} is not a byte-level BPE tokenizer; distillery supports GPT-2 and "
                             "RoBERTa style tokenizers only.")
    return backend


def _read_bpe(directory: Path) -> BPE:
    vocab, merges = directory / VOCAB_FILE, directory / MERGES_FILE
    try:
        return BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for any bad file
        raise TokenizerError(f"{vocab} and {merges} do not form a BPE vocabulary ({e}); fix or re-create "
                             "them.") from e


def _style(tokenizer_config: dict[str, Any], model_config: dict[str, Any], token_to_id) -> str:
    for source, key in ((tokenizer_config, "tokenizer_class"), (model_config, "model_type")):
        name = source.get(key)
        if name is None:
            continue
        if name not in STYLE_NAMES:
            raise TokenizerError(f"{key} {name!r} is not a tokenizer distillery supports; it reads GPT-2 and "
                                 "RoBERTa byte-level BPE tokenizers.")
        return STYLE_NAMES[name]
    return "roberta" if token_to_id("<s>") is not None and token_to_id("<mask>") is not None else "gpt2"


def _model_max_length(style: str, tokenizer_config: dict[str, Any], model_config: dict[str, Any]) -> int:
    value = tokenizer_config.get("model_max_length")
    if isinstance(value, int) and value < 10**9:  # transformers writes 1e30 for "no limit known"
        return value
    if "n_positions" in model_config:
        return int(model_config["n_positions"])
    if "max_position_embeddings" in model_config:
        # RoBERTa's positions start after padding_idx, so two of them are never used by tokens.
        return int(model_config["max_position_embeddings"]) - 2
    return STYLE_MAX_LENGTH[style]
