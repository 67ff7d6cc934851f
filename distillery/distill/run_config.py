"""Every setting of a training or distillation run, as one typed dataclass.

A run's settings come from three layers, later ones winning: the defaults below, a YAML file
(`--config run.yaml`, or the run's own config.yaml when resuming), and command-line flags. The
resolved settings are saved with the run as config.yaml, so a run can always be reproduced.
Defaults for distillation are those of the published DistilBERT run (T = 2, alpha_ce 5,
alpha_lm 2, alpha_cos 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distillery.distill.chunked_losses import DEFAULT_CHUNK_SIZE
from distillery.models.common import DistilleryError

KINDS = ("train", "distill")
KD_LOSSES = ("forward_kl", "reverse_kl", "gjsd")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COS_LAYERS = ("last", "mapped")
TEACHER_DTYPES = ("fp32", "int8", "bf16")
OBJECTIVES = ("lm", "embedding")

# Settings that may differ between a run and its resumption without changing what is trained.
# How the losses are computed (chunked, compiled) changes float rounding, not what is trained.
RESUMABLE_CHANGES = frozenset({"max_steps", "eval_every", "save_every", "log_every", "eval_batches",
                               "out", "device", "plot", "carbon_region", "chunked_loss", "loss_chunk_size",
                               "compile"})
DEFAULT_SEQ_LEN = 256  # a run's --seq-len unless given; lowered to fit a model or a teacher cache


@dataclass
class RunConfig:
    """One training (`kind="train"`) or distillation (`kind="distill"`) run."""

    kind: str = "distill"
    data: str = ""  # a folder written by `distillery prepare`
    out: str = ""  # the run folder
    model: str | None = None  # train: a checkpoint folder / hub id, or a preset name (gpt2, roberta-base, ...)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # train from a preset: n_layer, ...
    teacher: str | None = None  # distill
    student: str | None = None  # distill: a folder made by `distillery student`
    tokenizer: str | None = None  # default: the model's (or teacher's) folder
    seed: int = 0

    # Optimisation. batch_size counts sequences per optimizer step over all processes and
    # accumulation steps, so a run means the same thing on 1 or 8 GPUs.
    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = DEFAULT_SEQ_LEN
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto: bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU
    device: str = "auto"
    # The vocabulary head and losses over chunks of loss_chunk_size positions (chunked_losses.py):
    # the same numbers as the plain path without ever holding (positions x vocabulary) logits.
    chunked_loss: bool = True
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE
    compile: bool = False  # torch.compile the student's forward (and so its backward)

    # Distillation losses.
    temperature: float = 2.0
    alpha_ce: float = 5.0  # soft-target loss (kd_loss)
    alpha_lm: float = 2.0  # hard LM loss (causal or masked)
    alpha_cos: float = 1.0  # cosine between hidden states
    alpha_mse: float = 0.0  # MSE between logits
    kd_loss: str = "forward_kl"
    beta: float = 0.5  # gjsd only: 0 behaves as forward KL, 1 as reverse KL
    cos_layers: str = "last"  # "mapped": every student layer against its teacher layer
    layer_map: list[int] | None = None  # teacher layer of each student layer; default: the student recipe's
    kd_masked_only: bool = False  # masked LM: soft targets only at masked positions
    teacher_dtype: str = "fp32"  # the frozen teacher's forward: fp32, int8 (CPU) or bf16
    # A folder made by `distillery teacher-cache`: the teacher's stored top-k instead of the teacher
    # (sparse KD loss, windows drawn from the cache's enumeration; see distill/teacher_cache.py).
    teacher_cache: str | None = None
    # "embedding": sentence encoders, pooled embeddings matched by MSE (distill/embedding.py); the
    # data is a folder of sentences (`prepare --sentences`), alpha_cos weighs the last hidden states.
    objective: str = "lm"
    alpha_emb: float = 1.0  # embedding: MSE between pooled sentence embeddings
    alpha_attn: float = 0.0  # embedding: MiniLM's self-attention relations of the last layer
    relation_heads: int = 12  # embedding: heads the relations are split into
    eval_sts: str | None = None  # embedding: an STS-B file scored at each evaluation

    # Masked LM.
    mlm_prob: float = 0.15
    mlm_smoothing: float = 0.7

    # Bookkeeping.
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    log_every: int = 10
    plot: bool = True
    # Where the electricity came from, for kg CO2-eq: "provider:region" (e.g. azure:eastus) or a
    # country code (see distillery.evaluate.energy); default: the world average.
    carbon_region: str | None = None

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("kd_loss", self.kd_loss, KD_LOSSES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("cos_layers", self.cos_layers, COS_LAYERS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "save_every", "log_every", "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DistilleryError(f"Setting {name} must be a positive integer, got {value!r}.")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise DistilleryError(f"Setting {name} must be positive, got {getattr(self, name)!r}.")
        for name in ("alpha_ce", "alpha_lm", "alpha_cos", "alpha_mse", "weight_decay", "grad_clip",
                     "warmup_steps", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise DistilleryError(f"Setting {name} must not be negative, got {getattr(self, name)!r}.")
        if not 0.0 <= self.beta <= 1.0:
            raise DistilleryError(f"Setting beta must lie in [0, 1], got {self.beta!r}.")
        if not 0.0 < self.mlm_prob < 1.0:
            raise DistilleryError(f"Setting mlm_prob must lie in (0, 1), got {self.mlm_prob!r}.")
        if self.batch_size % self.grad_accum:
            raise DistilleryError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum}); "
                "change one of them."
            )
        if self.objective == "embedding":
            self._check_embedding()
        elif self.teacher_cache:
            self._check_teacher_cache()
        elif self.eval_sts:
            raise DistilleryError("eval_sts (--eval-sts) scores sentence embeddings; it goes with --objective embedding.")
        elif self.kind == "distill" and self.alpha_ce + self.alpha_lm + self.alpha_cos + self.alpha_mse == 0:
            raise DistilleryError("All loss weights (alpha_ce, alpha_lm, alpha_cos, alpha_mse) are 0; set one.")

    def _check_embedding(self) -> None:
        """The embedding objective's own settings."""
        if self.kind != "distill":
            raise DistilleryError("The embedding objective is for distillation (`distillery distill`).")
        if self.alpha_emb < 0 or self.alpha_attn < 0:
            raise DistilleryError("Settings alpha_emb and alpha_attn must not be negative.")
        if self.alpha_emb + self.alpha_cos + self.alpha_attn == 0:
            raise DistilleryError("All embedding loss weights (alpha_emb, alpha_cos, alpha_attn) are 0; set one.")
        if isinstance(self.relation_heads, bool) or not isinstance(self.relation_heads, int) \
                or self.relation_heads <= 0:
            raise DistilleryError(f"Setting relation_heads must be a positive integer, got {self.relation_heads!r}.")
        if self.teacher_cache:
            raise DistilleryError("--teacher-cache holds a causal LM's targets; the embedding objective needs --teacher.")

    def _check_teacher_cache(self) -> None:
        """What a run from stored top-k targets cannot do, refused before anything loads."""
        if self.teacher:
            raise DistilleryError("--teacher and --teacher-cache both name the teacher; pass one of them.")
        if self.kind != "distill" or self.objective != "lm":
            raise DistilleryError("--teacher-cache is for language-model distillation (`distillery distill`, "
                                  "--objective lm).")
        if self.kd_loss != "forward_kl" or self.alpha_mse > 0:
            asked = f"--kd-loss {self.kd_loss}" if self.kd_loss != "forward_kl" else f"--alpha-mse {self.alpha_mse:g}"
            raise DistilleryError(f"--teacher-cache holds the teacher's top-k log-probabilities, enough for "
                                  f"--kd-loss forward_kl only and not for the logits MSE, so not for {asked}; use "
                                  "those (--alpha-mse 0) or distil online with --teacher.")
        if self.alpha_cos > 0 and self.cos_layers != "last":
            raise DistilleryError("--teacher-cache holds the teacher's last hidden states only; use --cos-layers "
                                  "last or --alpha-cos 0.")

    # ------------------------------------------------------------------------------------------
    # Layers: defaults <- YAML <- flags

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "the settings") -> RunConfig:
        """Build from a mapping, naming any unknown key and where it came from."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DistilleryError(
                f"{source} has unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(names))}."
            )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {name: _typed(name, value, defaults[name], source) for name, value in values.items()}
        try:
            return cls(**values)
        except TypeError as e:
            raise DistilleryError(f"{source}: {e}.") from e

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Settings from a YAML file; `overrides` (those not None) win over the file."""
        return cls.from_dict({**read_yaml(path), **_given(overrides)}, source=str(path))

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with the given (not None) settings changed, validated again."""
        return RunConfig.from_dict({**asdict(self), **_given(overrides)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        from distillery.models.checkpoint import atomic_write

        with atomic_write(Path(path), "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def identity(self) -> dict[str, Any]:
        """The settings that define what a checkpoint is a checkpoint of (compared on resume)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DistilleryError(f"Config file {path} does not exist; check the path given to --config.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)  # YAML's own text spans lines; one line of it is enough
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DistilleryError(f"{path} is not valid YAML ({getattr(e, 'problem', None) or e}{where}); fix the file.") from e
    if not isinstance(values, dict):
        raise DistilleryError(f"{path} must hold a mapping of setting: value, not a {type(values).__name__}.")
    return values


def config_differences(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """`name: saved -> current` for every identity setting that differs.

    A setting the checkpoint does not name (it predates the setting) counts as its default.
    """
    now = current.identity()
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in now}, **saved}
    keys = sorted(set(now) | {k for k in saved if k not in RESUMABLE_CHANGES})
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _typed(name: str, value: Any, default: Any, source: str) -> Any:
    """`value` as the kind of its setting's default. YAML reads `1e-3` (no dot) as text, so text that
    spells a number becomes one; anything else of the wrong kind, or not finite, is named with its source."""
    import math

    kind = type(default)
    if value is None or default is None or kind not in (bool, int, float, str):
        return value
    if kind in (int, float) and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise DistilleryError(f"{source}: setting {name} must be a finite number, got {value!r}.")
    if kind is float and not isinstance(value, bool) and isinstance(value, (int, float)):
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[kind]
        raise DistilleryError(f"{source}: setting {name} must be {what}, got {value!r}.")
    return value


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DistilleryError(f"Setting {name} must be one of {', '.join(choices)}, got {value!r}.")
