"""GPT-2's and RoBERTa's byte-level BPE and BERT's WordPiece tokenizers, on the `tokenizers` library.

A folder holds tokenizer.json (used as written), vocab.json + merges.txt (byte-level BPE) or
vocab.txt (WordPiece), from which the conventions of its style rebuild what the files do not say:

- gpt2: no prefix space, nothing added around a text, `<|endoftext|>` a special token (50256).
- roberta: `<s> A </s>` and `<s> A </s></s> B </s>`, ids <s>=0 <pad>=1 </s>=2 <unk>=3, and
  `<mask>` a special token that absorbs the space before it ("a <mask>" -> "a", "<mask>").
- bert: BertNormalizer (do_lower_case, strip_accents, tokenize_chinese_chars from
  tokenizer_config.json), BertPreTokenizer, WordPiece with `##` continuations and `[UNK]` for a
  word it cannot split or longer than 100 characters; `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`
  with token_type_ids 0 for A and 1 for B. BERT has no bos/eos tokens of its own: `bos_token` and
  `eos_token` are `[CLS]` and `[SEP]`, the tokens that open and close an encoded text, so code that
  frames a sequence as bos … eos works for every style.

The style comes from tokenizer_config.json (tokenizer_class) or config.json (model_type) when
present, else from the files (vocab.txt or a WordPiece tokenizer.json is bert; a BPE vocabulary
with `<s>` and `<mask>` is roberta, any other gpt2).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, WordPiece

from distillery.models.common import DistilleryError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
WORDPIECE_VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MODEL_CONFIG_FILE = "config.json"

STYLES = ("gpt2", "roberta", "bert")
TOKENIZER_CLASSES = {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer", "bert": "BertTokenizer"}
# tokenizer_class / model_type values that name a style.
STYLE_NAMES = {
    "GPT2Tokenizer": "gpt2", "GPT2TokenizerFast": "gpt2", "gpt2": "gpt2",
    "RobertaTokenizer": "roberta", "RobertaTokenizerFast": "roberta", "roberta": "roberta",
    "BertTokenizer": "bert", "BertTokenizerFast": "bert", "bert": "bert",
    "DistilBertTokenizer": "bert", "DistilBertTokenizerFast": "bert", "distilbert": "bert",
}
# The special tokens of each style, and the positions the real models were trained with. BERT's
# bos/eos are its cls/sep (see the module docstring).
STYLE_SPECIAL_TOKENS: dict[str, dict[str, str | None]] = {
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "pad_token": None, "mask_token": None, "cls_token": None, "sep_token": None},
    "roberta": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"},
    "bert": {"bos_token": None, "eos_token": None, "unk_token": "[UNK]", "pad_token": "[PAD]",
             "mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"},
}
STYLE_MAX_LENGTH = {"gpt2": 1024, "roberta": 512, "bert": 512}
# The keys the fingerprint records (fixed: fingerprints of saved data must not drift) ...
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
# ... and all the special token keys a tokenizer_config.json / special_tokens_map.json may set.
ALL_SPECIAL_TOKEN_KEYS = (*SPECIAL_TOKEN_KEYS, "cls_token", "sep_token")
# BertTokenizer's own special tokens, in the order its special_tokens_map.json lists them.
BERT_SPECIAL_TOKEN_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json options of BertTokenizer -> BertNormalizer's, with transformers' defaults.
BERT_NORMALIZER_OPTIONS = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                           "tokenize_chinese_chars": ("handle_chinese_chars", True)}
WORDPIECE_MAX_WORD_CHARS = 100  # a longer word is one [UNK], as in BERT
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")


class TokenizerError(DistilleryError):
    """A tokenizer folder, file or argument that cannot be used."""


class Tokenizer:
    """A byte-level BPE or WordPiece tokenizer: the `tokenizers` backend plus the style's special tokens.

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
        self.cls_token, self.sep_token = special_tokens.get("cls_token"), special_tokens.get("sep_token")
        if style == "bert":
            self.bos_token, self.eos_token = self.cls_token, self.sep_token
        for key in ALL_SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
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
    def cls_token_id(self) -> int | None:
        return self._id(self.cls_token)

    @property
    def sep_token_id(self) -> int | None:
        return self._id(self.sep_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special added tokens (`skip_special_tokens` drops exactly these)."""
        return list(self._special_ids)

    def __repr__(self) -> str:
        return f"Tokenizer(style={self.style!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of one text; when `add_special_tokens`, RoBERTa adds `<s> … </s>`, BERT `[CLS] … [SEP]`,
        GPT-2 nothing."""
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

        The bert style also returns `token_type_ids` (0 for the first text, 1 for the pair), as
        transformers' BertTokenizer does.

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
        columns = {"input_ids": [e.ids for e in encodings]}
        if self.style == "bert":
            columns["token_type_ids"] = [e.type_ids for e in encodings]
        columns["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors is None:
            return {key: rows[0] if single else rows for key, rows in columns.items()}
        import torch

        if len({len(ids) for ids in columns["input_ids"]}) > 1:
            raise TokenizerError("The texts have different lengths, so they cannot form one tensor; pass "
                                 "padding=True.")
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in columns.items()}

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        """The text of `ids` (invalid UTF-8 becomes U+FFFD, as transformers' errors="replace").

        transformers 5.23 defaults to no clean-up for GPT-2 and RoBERTa, and its pipelines do not
        ask for it (it even ignores a request for it on BPE tokenizers, where it would glue real
        spaces to punctuation). Passing True here applies transformers' classic clean-up (" ." ->
        ".", " n't" -> "n't", …), for output meant to match older transformers releases. BERT's
        WordPiece decoder joins `##` pieces and cleans up the spaces before punctuation itself,
        as transformers' BertTokenizer does.
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
        """The vocabulary strings of one id or a list of ids (byte-level BPE writes a space as "Ġ";
        WordPiece marks a piece inside a word with "##")."""
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
        from distillery.tokenizer.streaming import IncrementalDecoder, WordPieceIncrementalDecoder

        if self.style == "bert":
            return WordPieceIncrementalDecoder(self, skip_special_tokens=skip_special_tokens)
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- identity and saving ------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 of what decides the ids: vocabulary, merges, added tokens and their flags, style
        (and for WordPiece the normalizer, pre-tokenizer, post-processor and unknown-word rules).

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
        if self.style == "bert":
            # Byte-level BPE's pipeline is fixed by its style; a WordPiece one is set by its files
            # (lower-casing changes every id), so it is part of the identity.
            canonical["wordpiece"] = {
                "pipeline": [state.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor")],
                "model": [model.get(key) for key in ("unk_token", "continuing_subword_prefix",
                                                     "max_input_chars_per_word")],
                "cls_sep": [self.cls_token, self.sep_token]}
        blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """tokenizer.json, the vocabulary (vocab.json + merges.txt, or WordPiece's vocab.txt),
        tokenizer_config.json and special_tokens_map.json, each written atomically, in the layout
        transformers' AutoTokenizer loads."""
        from distillery.models.checkpoint import atomic_write, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        serialized = self.backend.to_str(pretty=True)
        state = json.loads(serialized)
        with atomic_write(directory / TOKENIZER_FILE, "w") as f:
            f.write(serialized)
        vocab = dict(sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1]))
        if self.style == "bert":
            # One token per line, the line number its id (tokens never hold a line break: the
            # pre-tokenizer splits on whitespace).
            with atomic_write(directory / WORDPIECE_VOCAB_FILE, "w") as f:
                f.write("".join(token + "\n" for token in vocab))
        else:
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
        # BERT's bos/eos are only our names for its cls/sep; transformers' BertTokenizer has none.
        for key in BERT_SPECIAL_TOKEN_KEYS if self.style == "bert" else ALL_SPECIAL_TOKEN_KEYS:
            token = getattr(self, key)
            if token is None:
                continue
            entry = added.get(token)
            # A token with non-default matching (RoBERTa's <mask> eats the space before it) keeps
            # its flags, so that transformers rebuilds it the same way.
            tokens[key] = token if entry is None or not (entry["lstrip"] or entry["rstrip"]) else {
                k: entry[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word")}
        return tokens

    def _tokenizer_config(self, state: dict[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": TOKENIZER_CLASSES[self.style],
            "model_max_length": self.model_max_length or STYLE_MAX_LENGTH[self.style],
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                  "special")}
                for t in state.get("added_tokens", [])},
        }
        if self.style == "bert":
            normalizer = state.get("normalizer") or {}
            if normalizer.get("type") == "BertNormalizer":
                for option, (field, _) in BERT_NORMALIZER_OPTIONS.items():
                    config[option] = normalizer[field]
        else:
            config["add_prefix_space"] = False
            config["errors"] = "replace"
        if self.style == "gpt2":
            config["add_bos_token"] = False
        elif self.style == "roberta":
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
    """The tokenizer of a model folder or hub id: tokenizer.json, else vocab.txt (WordPiece) or
    vocab.json + merges.txt (byte-level BPE).

    The style (gpt2, roberta or bert) comes from tokenizer_config.json / config.json when present,
    else from the files; see this module's docstring for what each style adds. From vocab.txt,
    tokenizer_config.json's do_lower_case, strip_accents and tokenize_chinese_chars set the
    normalizer, as in transformers' BertTokenizer.
    """
    from distillery.models.checkpoint import resolve_model_dir

    directory = resolve_model_dir(name_or_path)
    tokenizer_config = _read_json(directory / TOKENIZER_CONFIG_FILE)
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
    model_config = _read_json(directory / MODEL_CONFIG_FILE)
    named, named_by = _named_style(tokenizer_config, model_config)
    has_bpe_files = (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file()
    backend = bpe = None
    if (directory / TOKENIZER_FILE).is_file():
        backend = _read_backend(directory / TOKENIZER_FILE)
        wordpiece = isinstance(backend.model, WordPiece)
    elif (directory / WORDPIECE_VOCAB_FILE).is_file() and not (named in ("gpt2", "roberta") and has_bpe_files):
        wordpiece = True
    elif has_bpe_files:
        bpe, wordpiece = _read_bpe(directory), False
    else:
        raise TokenizerError(f"{directory} has no {TOKENIZER_FILE}, no {WORDPIECE_VOCAB_FILE} and no {VOCAB_FILE} + "
                             f"{MERGES_FILE}; pass a folder that holds the tokenizer files (save them with "
                             "save_pretrained).")
    if named is not None and (named == "bert") != wordpiece:
        raise TokenizerError(f"{named_by} names a {_KINDS[named == 'bert']} tokenizer but {directory} holds a "
                             f"{_KINDS[wordpiece]} one; fix the name or use the model's own tokenizer files.")
    if named is not None:
        style = named
    elif wordpiece:
        style = "bert"
    else:
        token_to_id = (bpe or backend).token_to_id
        style = "roberta" if token_to_id("<s>") is not None and token_to_id("<mask>") is not None else "gpt2"
    special_tokens = dict(STYLE_SPECIAL_TOKENS[style])
    for key in ALL_SPECIAL_TOKEN_KEYS:
        for source, name in ((special_map, SPECIAL_TOKENS_MAP_FILE), (tokenizer_config, TOKENIZER_CONFIG_FILE)):
            if key in source:
                special_tokens[key] = _special_token(source[key], key, directory / name)
                break
    if bpe is not None:
        backend = build_backend(bpe, style)
    elif backend is None:
        backend = _read_wordpiece(directory, special_tokens, tokenizer_config)
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


def wordpiece_tokenizer(model: WordPiece, lowercase: bool = True, strip_accents: bool | None = None,
                        handle_chinese_chars: bool = True) -> tokenizers.Tokenizer:
    """BERT's pipeline around a WordPiece model: BertNormalizer (clean_text drops control characters
    and turns whitespace into spaces; handle_chinese_chars puts spaces around CJK ideographs;
    strip_accents None follows lowercase), BertPreTokenizer (whitespace and punctuation), and the
    WordPiece decoder that joins `##` pieces. What training needs; no special tokens yet."""
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return backend


def build_wordpiece_backend(model: WordPiece, special_tokens: dict[str, str | None], lowercase: bool = True,
                            strip_accents: bool | None = None,
                            handle_chinese_chars: bool = True) -> tokenizers.Tokenizer:
    """`wordpiece_tokenizer` plus BERT's special tokens (matched in the raw text, before
    lower-casing) and its template: `[CLS] A [SEP]`, `[CLS] A [SEP] B [SEP]` with B's type id 1.
    The special tokens must already be in the model's vocabulary."""
    backend = wordpiece_tokenizer(model, lowercase, strip_accents, handle_chinese_chars)
    backend.add_special_tokens([AddedToken(special_tokens[key], special=True, normalized=False)
                                for key in BERT_SPECIAL_TOKEN_KEYS if special_tokens.get(key) is not None])
    cls, sep = special_tokens["cls_token"], special_tokens["sep_token"]
    assert model.token_to_id(cls) is not None and model.token_to_id(sep) is not None, (cls, sep)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, model.token_to_id(cls)), (sep, model.token_to_id(sep))])
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); fix or re-create it.") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object ({{...}}), not a JSON {type(value).__name__}; fix "
                             "or re-create it.")
    return value


def _read_backend(path: Path) -> tokenizers.Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for any bad file
        raise TokenizerError(f"{path} is not a tokenizer file the tokenizers library can read ({e}); "
                             "re-create it with save_pretrained.") from e
    if isinstance(backend.model, WordPiece):
        unk = backend.model.unk_token
        if backend.token_to_id(unk) is None:
            raise TokenizerError(_missing_unk_message(path, unk))
        return backend
    if not isinstance(backend.model, BPE) or not isinstance(backend.decoder, decoders.ByteLevel):
        raise TokenizerError(f"{path} is neither a byte-level BPE nor a WordPiece tokenizer; distillery supports "
                             "GPT-2, RoBERTa and BERT style tokenizers only.")
    return backend


def _read_bpe(directory: Path) -> BPE:
    vocab, merges = directory / VOCAB_FILE, directory / MERGES_FILE
    try:
        return BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="",
                             fuse_unk=False)
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for any bad file
        raise TokenizerError(f"{vocab} and {merges} do not form a BPE vocabulary ({e}); fix or re-create "
                             "them.") from e


def _read_wordpiece(directory: Path, special_tokens: dict[str, str | None],
                    tokenizer_config: dict[str, Any]) -> tokenizers.Tokenizer:
    """BERT's tokenizer from vocab.txt, as transformers' BertTokenizer builds it."""
    path = directory / WORDPIECE_VOCAB_FILE
    vocab = _read_wordpiece_vocab(path)
    for key in BERT_SPECIAL_TOKEN_KEYS:
        token = special_tokens[key]
        if key == "unk_token" and token not in vocab:
            raise TokenizerError(_missing_unk_message(path, token, f" or set unk_token in {TOKENIZER_CONFIG_FILE}"))
        if (token is None and key in ("cls_token", "sep_token")) or (token is not None and token not in vocab):
            raise TokenizerError(f"The {key} {token!r} is not in {path}; add it to the vocabulary or set {key} in "
                                 f"{TOKENIZER_CONFIG_FILE}.")
    model = WordPiece(vocab, unk_token=special_tokens["unk_token"], continuing_subword_prefix="##",
                      max_input_chars_per_word=WORDPIECE_MAX_WORD_CHARS)
    return build_wordpiece_backend(model, special_tokens, **_bert_normalizer_options(tokenizer_config, directory))


def _read_wordpiece_vocab(path: Path) -> dict[str, int]:
    """vocab.txt as transformers reads it: one token per line, its line number the id."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text ({e}); re-create the vocabulary as UTF-8.") from e
    if not lines:
        raise TokenizerError(f"{path} is empty; a WordPiece vocabulary holds one token per line (re-create it "
                             "with save_pretrained or `distillery tokenizer train --style bert`).")
    # Only the line end goes: a token may end in other whitespace.
    return {line.rstrip("\n"): i for i, line in enumerate(lines)}


def _missing_unk_message(path: Path, unk: str | None, other_fix: str = "") -> str:
    return (f"The WordPiece vocabulary in {path} has no unknown token {unk!r}, which WordPiece needs for words "
            f"it cannot split; add {unk!r} to the vocabulary{other_fix}.")


_KINDS = {True: "WordPiece", False: "byte-level BPE"}


def _named_style(tokenizer_config: dict[str, Any], model_config: dict[str, Any]) -> tuple[str | None, str]:
    """The style the configs name, and where (for messages); None when neither names one."""
    for source, key, file in ((tokenizer_config, "tokenizer_class", TOKENIZER_CONFIG_FILE),
                              (model_config, "model_type", MODEL_CONFIG_FILE)):
        name = source.get(key)
        if name is None:
            continue
        if name not in STYLE_NAMES:
            raise TokenizerError(f"{key} {name!r} is not a tokenizer distillery supports; it reads GPT-2 and "
                                 "RoBERTa byte-level BPE and BERT WordPiece tokenizers.")
        return STYLE_NAMES[name], f"{key} {name!r} in {file}"
    return None, ""


def _special_token(value: Any, key: str, path: Path) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{key} in {path} must be a token string (or an object with its content), not "
                             f"{value!r}; fix {key}.")
    return value


def _bert_normalizer_options(tokenizer_config: dict[str, Any], directory: Path) -> dict[str, bool | None]:
    """BertNormalizer's keyword arguments from BertTokenizer's tokenizer_config.json options."""
    options = {}
    for option, (field, default) in BERT_NORMALIZER_OPTIONS.items():
        value = tokenizer_config.get(option, default)
        if not (isinstance(value, bool) or (value is None and option == "strip_accents")):
            allowed = "true, false or null" if option == "strip_accents" else "true or false"
            raise TokenizerError(f"{option} in {directory / TOKENIZER_CONFIG_FILE} is {value!r}; set it to "
                                 f"{allowed}.")
        options[field] = value
    return options


def _model_max_length(style: str, tokenizer_config: dict[str, Any], model_config: dict[str, Any]) -> int:
    value = tokenizer_config.get("model_max_length")
    if isinstance(value, int) and value < 10**9:  # transformers writes 1e30 for "no limit known"
        return value
    if "n_positions" in model_config:
        return int(model_config["n_positions"])
    if "max_position_embeddings" in model_config:
        # RoBERTa's positions start after padding_idx, so two of them are never used by tokens.
        return int(model_config["max_position_embeddings"]) - (0 if style == "bert" else 2)
    return STYLE_MAX_LENGTH[style]
