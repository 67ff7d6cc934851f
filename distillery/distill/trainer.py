"""One training loop for pre-training, fine-tuning and distillation of causal and masked LMs.

Reads top to bottom: setup (devices, processes, models, data) -> the losses of one micro-batch ->
the optimizer step -> evaluation -> checkpoints -> the loop itself.

The loop, per optimizer step:
  1. draw the *global* batch (batch_size windows of seq_len + 1 tokens) from the run's data
     generator; every process draws the same one, masks it the same way, and keeps its own rows
     (what a DistributedSampler does), so N processes train on exactly what 1 process would;
  2. split this process's rows into grad_accum micro-batches; for each, run the student (and the
     frozen teacher under inference mode) and weight every loss term by its share of the global
     batch's counted positions, so the summed loss is the global mean however it is split;
  3. clip, step AdamW and the warm-up/decay schedule;
  4. every eval_every steps, validation perplexity; every save_every steps, a checkpoint written
     atomically (a temporary file, then a rename) with everything `--resume` needs to continue
     bit for bit: model, optimizer, schedule, loss scaler, step, and the Python, NumPy, torch and
     data generator random states.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distillery.allocator import map_large_blocks
from distillery.distill import losses
from distillery.distill.chunked_losses import VocabLosses, fused_vocab_losses
from distillery.distill.run_config import DEFAULT_SEQ_LEN, RunConfig, config_differences
from distillery.models.checkpoint import (
    atomic_write,
    build_model,
    family_of_config,
    load_model,
    preset_config,
    preset_names,
    write_json,
)
from distillery.models.common import DistilleryError, Pretrained, weights_finite

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
ENERGY_NAME = "energy.json"
CONFIG_NAME = "config.yaml"
FINAL_MODEL_DIR = "model"
PLOT_NAME = "loss.png"
IGNORE_INDEX = -100

# Loss terms, and which positions each one averages over ("tokens": every input position;
# "masked": the masked positions of an MLM batch; "kd": the positions the soft targets cover).
TERM_POSITIONS = {"lm": "lm", "kd": "kd", "cos": "tokens", "mse": "kd"}


# ----------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Processes:
    """This process's place in a (possibly single-process) torch.distributed run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes(device: str = "auto") -> Processes:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world_size == 1:
        return Processes(device=torch.device("cuda" if use_cuda else "cpu") if device == "auto"
                         else torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ----------------------------------------------------------------------------------------------
# Models, tokenizer and data


# The size flags carry GPT-2's names; each family's config calls them its own way.
_ENCODER_SIZES = {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
                  "n_inner": "intermediate_size", "n_positions": "max_position_embeddings"}
PRESET_SIZE_NAMES: dict[str, dict[str, str]] = {
    "gpt2": {},
    "roberta": _ENCODER_SIZES,
    "bert": _ENCODER_SIZES,
    "distilbert": {"n_layer": "n_layers", "n_head": "n_heads", "n_embd": "dim", "n_inner": "hidden_dim",
                   "n_positions": "max_position_embeddings"},
}
# The token ids a preset takes from the tokenizer (BERT's and DistilBERT's configs have no bos/eos).
PRESET_TOKEN_IDS = {"gpt2": ("bos_token_id", "eos_token_id"),
                    "roberta": ("bos_token_id", "eos_token_id", "pad_token_id"),
                    "bert": ("pad_token_id",), "distilbert": ("pad_token_id",)}


def build_from_preset(name: str, overrides: dict[str, Any], tokenizer) -> Pretrained:
    """A freshly initialised model from any family's preset (`preset_names()`), sized for `tokenizer`:
    a causal LM for GPT-2, a masked LM for the encoders.

    `overrides` use GPT-2's size names (n_layer, n_head, n_embd, n_inner, n_positions), renamed
    per family by PRESET_SIZE_NAMES; an encoder given a width but no MLP width gets 4 x the width,
    as GPT-2 does. n_positions counts tokens: RoBERTa's table gets pad_token_id + 1 more rows,
    since its positions start after the pad id.
    """
    family = family_of_config(preset_config(name))
    sizes = PRESET_SIZE_NAMES[family]
    overrides = {sizes.get(k, k): v for k, v in overrides.items()}
    width, mlp_width = sizes.get("n_embd"), sizes.get("n_inner")
    if width in overrides and mlp_width not in overrides:
        overrides[mlp_width] = 4 * overrides[width]
    lacking = [k.removesuffix("_token_id") for k in PRESET_TOKEN_IDS[family] if getattr(tokenizer, k) is None]
    if lacking:
        raise DistilleryError(f"The {name} preset needs special tokens this tokenizer lacks ({', '.join(lacking)}); "
                              "train a tokenizer of its family's style (distillery tokenizer train --style) and "
                              "prepare the data with it.")
    if family == "roberta" and "max_position_embeddings" in overrides:
        overrides["max_position_embeddings"] += tokenizer.pad_token_id + 1
    specials = {"vocab_size": tokenizer.vocab_size, **{k: getattr(tokenizer, k) for k in PRESET_TOKEN_IDS[family]}}
    return build_model(preset_config(name, **{**specials, **overrides}))


def is_preset(name: str | None) -> bool:
    return name in preset_names()


def load_lm(name: str) -> Pretrained:
    """A checkpoint as a language model (encoder checkpoints get their masked-LM head)."""
    from distillery.models.checkpoint import read_config, resolve_model_dir

    directory = resolve_model_dir(name)
    task = None if read_config(directory).get("model_type") == "gpt2" else "masked-lm"
    return load_model(directory, task=task)


def load_run_tokenizer(config: RunConfig):
    """The run's tokenizer: --tokenizer, else the teacher's (distill) or model's folder, else the
    copy `distillery prepare` keeps with the data (a model trained from a preset)."""
    from distillery.models.checkpoint import resolve_model_dir
    from distillery.tokenizer import load_tokenizer

    model = config.teacher if config.kind == "distill" else config.model
    if config.tokenizer:
        return load_tokenizer(resolve_model_dir(config.tokenizer))
    if model and not is_preset(model):
        return load_tokenizer(resolve_model_dir(model))
    from distillery.distill.data import TOKENIZER_DIR

    return load_tokenizer(Path(config.data) / TOKENIZER_DIR)


def check_vocabularies(teacher: Pretrained, student: Pretrained, tokenizer) -> None:
    if teacher.config.vocab_size != student.config.vocab_size:
        raise DistilleryError(
            f"The teacher has a vocabulary of {teacher.config.vocab_size} tokens and the student "
            f"{student.config.vocab_size}; distillation needs the same tokenizer, so make the student "
            "from this teacher (`distillery student`)."
        )
    if teacher.family != student.family:
        raise DistilleryError(
            f"The teacher is a {teacher.family} model and the student a {student.family} model; "
            "distil within one family."
        )
    check_model_fits_tokenizer(student, tokenizer)


def check_model_fits_tokenizer(model: Pretrained, tokenizer) -> None:
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DistilleryError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} "
            "embeddings; use the tokenizer the model was trained with (--tokenizer)."
        )


def resolve_layer_map(config: RunConfig, teacher: Pretrained, student: Pretrained) -> list[int] | None:
    """Teacher layer for each student layer, for the per-layer cosine loss (None: last layer only)."""
    if config.kind != "distill" or config.alpha_cos == 0 or config.cos_layers == "last":
        return None
    from distillery.distill.student import default_student_layers, teacher_layers_of

    n_student, n_teacher = student.config.num_layers, teacher.config.num_layers
    if config.layer_map is not None:
        layers = list(config.layer_map)
    elif "teacher_layers" in student.config.extra:
        layers = teacher_layers_of(student)
    else:
        layers = default_student_layers(n_teacher)
    if len(layers) != n_student or not all(0 <= i < n_teacher for i in layers):
        raise DistilleryError(
            f"layer_map {layers} must name one teacher layer (0 to {n_teacher - 1}) for each of the "
            f"student's {n_student} layers; fix --layer-map or use --cos-layers last."
        )
    return layers


def open_teacher_cache(config: RunConfig, student: Pretrained, tokenizer, train_data, say: bool):
    """(the cache, config) for a --teacher-cache run, refusing one that does not fit the run; the
    default seq_len becomes the cache's (said once)."""
    from distillery.distill.teacher_cache import TeacherCache

    cache = TeacherCache(config.teacher_cache)
    if student.family != "gpt2":
        raise DistilleryError(f"--teacher-cache holds a causal LM's targets but the student is a {student.family} "
                              "masked LM; distil it online with --teacher.")
    if config.seq_len == DEFAULT_SEQ_LEN and config.seq_len != cache.seq_len:
        if say:
            print(f"note: --seq-len is the teacher cache's {cache.seq_len}", file=sys.stderr)
        config = config.replace(seq_len=cache.seq_len)
    cache.check_run(train_data.meta, tokenizer.fingerprint(), config.seq_len, student.config.vocab_size)
    check_model_fits_tokenizer(student, tokenizer)
    if config.alpha_cos > 0 and not cache.has_hidden:
        raise DistilleryError(f"The teacher cache {cache.path} holds no hidden states for the cosine loss; pass "
                              "--alpha-cos 0 or rebuild the cache with --hidden.")
    return cache, config


def prepare_teacher(teacher: Pretrained, dtype: str, device: torch.device) -> Pretrained:
    """The frozen teacher on `device`, its forward in `dtype`: fp32; int8 (CPU: FBGEMM's int8 linear
    layers, see generation/quantize.py); or bf16 (fast on GPUs, emulated and slow on most CPUs)."""
    if dtype == "int8" and device.type != "cpu":
        raise DistilleryError(f"--teacher-dtype int8 runs on the CPU only, but the run is on {device}; "
                              "use --teacher-dtype bf16 on a GPU.")
    teacher.to(device).eval().requires_grad_(False)
    if dtype == "int8":
        from distillery.generation.quantize import quantize_model

        quantize_model(teacher, "int8")
    elif dtype == "bf16":
        teacher.to(torch.bfloat16)
    return teacher


def compile_student(student: nn.Module, device: torch.device) -> nn.Module:
    """The student through torch.compile, for the training steps (its backward is compiled with its
    forward); the first step compiles. On a CPU, inductor builds C++ kernels: it needs a C++ compiler."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.exc import InvalidCxxCompiler

        try:
            get_cpp_compiler()
        except (InvalidCxxCompiler, OSError) as e:
            raise DistilleryError(f"--compile needs a working C++ compiler on a CPU ({e}); install g++ or "
                                  "leave --compile off.") from e
    return torch.compile(student)


def open_data(config: RunConfig, tokenizer):
    """(train, validation) TokenDatasets, refusing data prepared with another tokenizer.
    Whether a window fits in each is `check_windows`'s to say, once seq_len is settled."""
    from distillery.distill.data import TokenDataset, check_tokenizer

    train, val = TokenDataset(config.data, "train"), TokenDataset(config.data, "val")
    check_tokenizer(train.meta, tokenizer)
    return train, val


def check_windows(train, val, seq_len: int) -> None:
    """Both splits hold a window of seq_len + 1 tokens: refused before the first step, not when
    the first evaluation comes (a validation split too small once failed after the last step)."""
    for split in (train, val):
        split.check_fits(seq_len)


def default_seq_len_fitted(config: RunConfig, positions: int, say: bool) -> RunConfig:
    """`config` with seq_len lowered to the model's positions when it is the default and longer
    (saying so when `say`); a longer seq_len the user asked for is left for the caller to refuse."""
    if config.seq_len != DEFAULT_SEQ_LEN or config.seq_len <= positions:
        return config
    if say:
        print(f"note: --seq-len is lowered from its default {DEFAULT_SEQ_LEN} to the model's {positions} positions",
              file=sys.stderr)
    return config.replace(seq_len=positions)


def check_writable(folder: Path) -> None:
    """Refuse a run folder that cannot be written, before any work: a file is made and removed in
    it, or in the nearest existing folder above it (which the run will create it in)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DistilleryError(f"--out {folder} lies under the file {existing}; choose another --out.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DistilleryError(f"--out {folder} cannot be written ({e.strerror or e} in {existing}); choose another "
                              "--out or fix the folder's permissions.") from e


def plotting_available(wanted: bool) -> bool:
    """Whether loss.png can be drawn: asked for and matplotlib importable (a plain install of the
    package lacks it: one line says so, and the run goes on without the plot)."""
    if not wanted:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png is drawn (pip install matplotlib, or --no-plot).",
              file=sys.stderr)
        return False
    return True


def masking_weights(config: RunConfig, tokenizer) -> torch.Tensor:
    """Per-id masking weights, count^-mlm_smoothing, from the corpus token counts."""
    from distillery.distill.data import TOKEN_COUNTS_NAME
    from distillery.distill.masking import token_probabilities

    counts = np.load(Path(config.data) / TOKEN_COUNTS_NAME)
    return token_probabilities(counts, config.mlm_smoothing, tokenizer.all_special_ids)


# ----------------------------------------------------------------------------------------------
# One batch


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through page-locked memory and without waiting, so the copy
    overlaps the work already queued (CUDA orders it before the kernels that read it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass
class Batch:
    """Model inputs and targets for a (micro-)batch, on the CPU until `.to(device)`."""

    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): next tokens (causal) or labels with -100 (masked)
    kd_mask: torch.Tensor | None  # (B, T) positions the soft targets cover; None = all

    def rows(self, start: int, end: int) -> Batch:
        kd_mask = self.kd_mask[start:end] if self.kd_mask is not None else None
        return Batch(self.inputs[start:end], self.targets[start:end], kd_mask)

    def to(self, device: torch.device) -> Batch:
        kd_mask = host_to_device(self.kd_mask, device) if self.kd_mask is not None else None
        return Batch(host_to_device(self.inputs, device), host_to_device(self.targets, device), kd_mask)

    def position_counts(self) -> dict[str, int]:
        """How many positions each loss term averages over (see TERM_POSITIONS)."""
        tokens = self.inputs.numel()
        lm = int(self.targets.ne(IGNORE_INDEX).sum())
        kd = int(self.kd_mask.sum()) if self.kd_mask is not None else tokens
        return {"tokens": tokens, "lm": lm, "kd": kd}


def make_batch(windows: torch.Tensor, causal: bool, config: RunConfig, tokenizer=None,
               mask_weights: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Batch:
    """Windows of seq_len + 1 tokens -> inputs and targets (shifted, or masked for an MLM)."""
    if causal:
        return Batch(windows[:, :-1], windows[:, 1:], None)
    from distillery.distill.masking import mask_tokens

    tokens = windows[:, :-1].contiguous()
    inputs, labels = mask_tokens(tokens, None, mask_weights, tokenizer.mask_token_id, tokenizer.vocab_size,
                                 tokenizer.all_special_ids, config.mlm_prob, generator)
    kd_mask = labels.ne(IGNORE_INDEX) if config.kd_masked_only else None
    return Batch(inputs, labels, kd_mask)


def forward_lm(model: nn.Module, batch: Batch, causal: bool, hidden: bool, positions: torch.Tensor | None,
               logits: bool = True):
    """The model's output; with `logits` False, no logits but the vocabulary head's input (`head_input`)."""
    options = {} if logits else {"return_logits": False}
    if causal:
        return model(batch.inputs, output_hidden_states=hidden, **options)
    return model(batch.inputs, output_hidden_states=hidden, logits_positions=positions, **options)


def head_positions(batch: Batch, causal: bool, config: RunConfig, distilling: bool) -> torch.Tensor | None:
    """Where a masked LM needs its head: the masked positions, unless the soft targets cover every
    position (None: everywhere, as for a causal LM)."""
    if causal or (distilling and batch.kd_mask is None and config.alpha_ce + config.alpha_mse > 0):
        return None
    return batch.targets.ne(IGNORE_INDEX)


def loss_terms(student: nn.Module, teacher: nn.Module | None, batch: Batch, causal: bool,
               config: RunConfig, layers: list[int] | None) -> dict[str, torch.Tensor]:
    """The mean of each loss term over its positions in this batch: {"lm": ..., "kd": ..., ...}.

    The plain path, on full logits; `batch_loss` computes the same terms chunk by chunk.
    """
    distilling = teacher is not None
    want_hidden = distilling and config.alpha_cos > 0
    positions = head_positions(batch, causal, config, distilling)
    s = forward_lm(student, batch, causal, want_hidden, positions)
    lm_targets = batch.targets if positions is None else batch.targets[positions]
    terms = {"lm": losses.causal_lm_loss(s.logits, lm_targets) if causal
             else losses.masked_lm_loss(s.logits, lm_targets)}
    if not distilling:
        return terms

    # The teacher runs frozen under inference mode. Its outputs are cloned out of inference mode
    # because autograd must save them (they are the loss's targets) for the student's backward.
    with torch.inference_mode():
        t = forward_lm(teacher, batch, causal, want_hidden, positions)
        t_logits = t.logits
        t_hidden = t.hidden_states
    t_logits = t_logits.clone()
    kd_mask = batch.kd_mask if positions is None else None  # logits at `positions` already select
    if config.alpha_ce > 0:
        terms["kd"] = kd_loss(s.logits, t_logits, kd_mask, config)
    if config.alpha_mse > 0:
        terms["mse"] = losses.logits_mse(s.logits, t_logits, kd_mask)
    if want_hidden:
        terms["cos"] = cosine_term(s.hidden_states, t_hidden, layers)
    return terms


def cosine_term(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                layers: list[int] | None) -> torch.Tensor:
    """The hidden-state cosine loss: the last layers, or each student layer against its teacher layer."""
    pairs = [(len(student_hidden) - 1, len(teacher_hidden) - 1)] if layers is None else \
        [(i + 1, j + 1) for i, j in enumerate(layers)]  # hidden_states[0] is the embedding output
    # The teacher's states are cloned out of inference mode: autograd saves them for the backward.
    return sum(losses.hidden_cosine_loss(student_hidden[i], teacher_hidden[j].clone())
               for i, j in pairs) / len(pairs)


def batch_loss(model: nn.Module, teacher: nn.Module | None, batch: Batch, causal: bool, config: RunConfig,
               layers: list[int] | None, scales: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's part of the step's loss, sum_k scales[k] * term_k, and the terms (detached).

    With `config.chunked_loss`, the vocabulary terms (lm, kd, mse) come from the student's head
    and the losses computed together over chunks of positions (`chunked_losses.py`), the teacher's
    head made per chunk too; otherwise from `loss_terms` on full logits. The same numbers either way.
    """
    from distillery.distill.teacher_cache import CachedTargets

    if isinstance(teacher, CachedTargets):  # --teacher-cache: stored top-k targets, no teacher model
        return cached_batch_loss(model, teacher, batch, config, scales)
    if not config.chunked_loss:
        terms = loss_terms(model, teacher, batch, causal, config, layers)
        return sum(scales[k] * v for k, v in terms.items()), {k: v.detach() for k, v in terms.items()}
    distilling = teacher is not None
    want_hidden = distilling and config.alpha_cos > 0
    positions = head_positions(batch, causal, config, distilling)
    s = forward_lm(model, batch, causal, want_hidden, positions, logits=False)
    t = None
    if distilling:
        with torch.inference_mode():
            t = forward_lm(teacher, batch, causal, want_hidden, positions, logits=False)
    names = ["lm"] + [name for name, alpha in (("kd", config.alpha_ce), ("mse", config.alpha_mse))
                      if distilling and alpha > 0]
    spec = VocabLosses({k: scales[k] for k in names}, config.kd_loss, config.temperature, config.beta,
                       config.loss_chunk_size)
    kd_rows = batch.kd_mask if positions is None else None  # the head ran at `positions` only
    targets = batch.targets if positions is None else batch.targets[positions]
    loss, terms = vocab_losses(model, s.head_input, targets, spec, teacher, t.head_input if t is not None else None,
                                kd_rows)
    if want_hidden:
        cos = cosine_term(s.hidden_states, t.hidden_states, layers)
        loss = loss + scales["cos"] * cos
        terms["cos"] = cos.detach()
    return loss, terms


def cached_batch_loss(model: nn.Module, cached, batch: Batch, config: RunConfig,
                      scales: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`batch_loss` against a teacher cache: hard LM loss, `sparse_kd_loss` over the stored top-k ids
    and, if the cache holds them, the cosine to the teacher's last hidden states. With
    `config.chunked_loss` the head and both losses run fused over chunks of positions (the sparse
    KD's gradient in closed form, `chunked_losses.py`), otherwise on full logits; the same numbers
    either way."""
    from distillery.distill.teacher_cache import sparse_kd_loss

    want_hidden = config.alpha_cos > 0
    s = forward_lm(model, batch, True, want_hidden, None, logits=not config.chunked_loss)
    if config.chunked_loss:
        names = ["lm"] + (["kd"] if config.alpha_ce > 0 else [])
        spec = VocabLosses({k: scales[k] for k in names}, "sparse", config.temperature,
                           chunk_size=config.loss_chunk_size)
        k = cached.ids.size(-1)
        sparse = (cached.ids.reshape(-1, k), cached.logprobs.reshape(-1, k), cached.tail.reshape(-1))
        loss, terms = vocab_losses(model, s.head_input, batch.targets, spec, sparse_targets=sparse)
    else:
        terms = {"lm": losses.causal_lm_loss(s.logits, batch.targets)}
        if config.alpha_ce > 0:
            terms["kd"] = sparse_kd_loss(s.logits, cached.ids, cached.logprobs, cached.tail, config.temperature)
        loss = sum(scales[k] * v for k, v in terms.items())
        terms = {k: v.detach() for k, v in terms.items()}
    if want_hidden:
        cos = losses.hidden_cosine_loss(s.hidden_states[-1], cached.hidden)
        loss = loss + scales["cos"] * cos
        terms["cos"] = cos.detach()
    return loss, terms


def vocab_losses(model: nn.Module, head_input: torch.Tensor, targets: torch.Tensor, spec: VocabLosses,
                 teacher: nn.Module | None = None, teacher_head_input: torch.Tensor | None = None,
                 kd_rows: torch.Tensor | None = None, sparse_targets: tuple[torch.Tensor, ...] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`fused_vocab_losses` on the models' vocabulary heads, positions flattened."""
    student = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    student = getattr(student, "_orig_mod", student)  # under torch.compile
    head = student.get_submodule(student.vocabulary_head)
    teacher_head = teacher.get_submodule(teacher.vocabulary_head) if teacher is not None else None
    flat = teacher_head_input.flatten(0, -2) if teacher_head_input is not None else None
    return fused_vocab_losses(head_input.flatten(0, -2), head.weight, head.bias, targets.flatten(), spec, flat,
                              teacher_head, kd_rows.flatten() if kd_rows is not None else None, sparse_targets)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
            config: RunConfig) -> torch.Tensor:
    T = config.temperature
    if config.kd_loss == "forward_kl":
        return losses.soft_target_kl(student_logits, teacher_logits, T, mask)
    if config.kd_loss == "reverse_kl":
        return losses.reverse_kl(student_logits, teacher_logits, T, mask)
    return losses.generalized_jsd(student_logits, teacher_logits, config.beta, T, mask)


def term_weights(config: RunConfig) -> dict[str, float]:
    if config.kind == "train":
        return {"lm": 1.0}
    return {"lm": config.alpha_lm, "kd": config.alpha_ce, "cos": config.alpha_cos, "mse": config.alpha_mse}


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

FUSED_ADAMW_DEVICES = ("cpu", "cuda")
MMAP_THRESHOLD_BYTES = 4 * 2**20


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights (every parameter under 2-D) are not decayed.

    The fused kernel (one pass over each parameter, CPU and CUDA alike, transformers' Trainer default
    since torch 2.8) where the parameters allow it: on the 2-core CPU its step over a 16M-parameter
    student took 7 ms against foreach's 41 ms, and it needs no temporaries the size of the parameters
    (foreach's cost 77 MB at that size). Both give the same update up to rounding.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, fused=fused or None)


def lr_factor(step: int, config: RunConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warm-up, then linear or cosine decay to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    shape = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset, config: RunConfig, causal: bool, tokenizer=None,
                  mask_weights: torch.Tensor | None = None) -> float:
    """Mean LM loss on up to eval_batches sequential windows of `dataset` (its perplexity is exp).

    A masked LM is scored on the masked positions of a masking drawn from a generator seeded
    afresh each time, so every evaluation of a run sees the same masks.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed + 1)
    total, count = 0.0, 0
    # Whole batches (no gradients are kept), so the score does not depend on grad_accum.
    for i, windows in enumerate(dataset.iter_sequential(config.batch_size, config.seq_len)):
        if i >= config.eval_batches:
            break
        batch = make_batch(windows, causal, config, tokenizer, mask_weights, generator).to(device)
        n = batch.position_counts()["lm"]
        if n == 0:
            continue
        positions = None if causal else batch.targets.ne(IGNORE_INDEX)
        with torch.autocast(device.type, dtype=autocast_dtype(config.precision, device) or torch.float32,
                            enabled=autocast_dtype(config.precision, device) is not None):
            out = forward_lm(model, batch, causal, False, positions, logits=not config.chunked_loss)
            if config.chunked_loss:  # the head chunk by chunk, as in training: no full logits
                targets = batch.targets if positions is None else batch.targets[positions]
                lm, _ = vocab_losses(model, out.head_input, targets,
                                     VocabLosses({"lm": 1.0}, chunk_size=config.loss_chunk_size))
        if not config.chunked_loss:
            lm = losses.causal_lm_loss(out.logits, batch.targets) if causal \
                else losses.masked_lm_loss(out.logits, batch.targets)
        total += float(lm) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise DistilleryError(
            f"The validation split of {config.data} holds no window of {config.seq_len + 1} tokens; "
            "prepare more validation text or lower --seq-len."
        )
    return total / count


# ----------------------------------------------------------------------------------------------
# Checkpoints


def random_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random state the run draws from, as plain bytes, ints and tuples.

    Plain values load with weights_only=True and pass between processes without pickled tensors.
    """
    kind, keys, *rest = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), *rest),
        "torch": _state_bytes(torch.get_rng_state()),
        "data": _state_bytes(generator.get_state()),
    }
    if torch.cuda.is_available():
        states["cuda"] = [_state_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return states


def restore_random_states(states: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(_as_tuples(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(_state_tensor(states["torch"]))
    generator.set_state(_state_tensor(states["data"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_state_tensor(s) for s in states["cuda"]])


def _state_bytes(state: torch.Tensor) -> bytes:
    return state.cpu().numpy().tobytes()


def _state_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to a temporary file beside `path`, then rename it over `path`.

    The previous checkpoint stays whole until the new one is complete: a kill or a full disk
    during the write loses only the new one.
    """
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except OSError as e:
        hint = "free some disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder"
        raise DistilleryError(
            f"Could not write the checkpoint {path} ({e.strerror or e}); {hint} and rerun with --resume, "
            "which continues from the previous checkpoint (left intact)."
        ) from e


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DistilleryError(f"There is no checkpoint to resume at {path}; drop --resume to start the run afresh.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DistilleryError(f"The checkpoint {path} cannot be read ({type(e).__name__}); it is damaged, "
                              "start the run afresh without --resume.") from e


def check_same_layout(saved: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Refuse to resume from weights named otherwise than `model`'s (another model, or a checkpoint
    of an older distillery, whose RoBERTa kept query, key and value as three layers)."""
    ours = set(model.state_dict())
    missing, unexpected = sorted(ours - set(saved)), sorted(set(saved) - ours)
    if missing or unexpected:
        raise DistilleryError(
            f"{path} holds weights laid out for another model or distillery version (it lacks "
            f"{missing[:2]}, has {unexpected[:2]}); it cannot be resumed: start a new run with another --out, "
            "from the run's saved model folder if it has one."
        )


def check_resumable(checkpoint: dict[str, Any], config: RunConfig, tokenizer_fingerprint: str, path: Path) -> None:
    differences = config_differences(checkpoint["config"], config)
    if differences:
        raise DistilleryError(
            f"The checkpoint {path} belongs to a run with other settings ({'; '.join(differences[:3])}); "
            "resume with the run's own settings or start a new run in another --out folder."
        )
    if checkpoint["tokenizer"] != tokenizer_fingerprint:
        raise DistilleryError(
            f"The checkpoint {path} was trained with another tokenizer; resume with the run's own "
            "tokenizer or start a new run in another --out folder."
        )


# ----------------------------------------------------------------------------------------------
# Logs


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation (main process only)."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            # Steps after the checkpoint were lost with the interrupted process; they will be redone.
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
        with atomic_write(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, path: Path) -> None:
        """A PNG of the training loss (and its terms) and the validation loss against steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        train = [r for r in self.records if "loss" in r]
        for key in ("loss", "kd", "lm", "cos", "mse", "emb", "attn"):
            points = [(r["step"], r[key]) for r in train if key in r]
            if points:
                ax.plot(*zip(*points), label=f"train {key}", linewidth=1.5 if key == "loss" else 0.8)
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The loop


def run(config: RunConfig, resume: bool = False, progress: bool = True,
        folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train or distil as `config` says; returns a summary (steps, losses, perplexity, paths).

    With `resume`, continues the run in config.out from its last checkpoint exactly where it
    stopped. Launched by torchrun, each process trains its share of every batch (DDP). `folder`
    is where the run is written when that is not config.out itself (an --overwrite run is
    written beside it and swapped in by the caller); the summary names config.out.
    """
    from distillery.evaluate.energy import EnergyTracker

    procs = start_processes(config.device)
    out = Path(config.out if folder is None else folder)
    try:
        tracker = EnergyTracker(region=config.carbon_region)
        with tracker:
            try:
                summary = _run(config, procs, out, resume, progress)
            except (KeyboardInterrupt, Exception) as e:
                if procs.is_main and not isinstance(e, DistilleryError) and (out / CHECKPOINT_NAME).is_file():
                    print(f"{out / CHECKPOINT_NAME} keeps the last checkpoint; rerun with "
                          f"{resume_flags(out / CHECKPOINT_NAME, config)} to continue from it.", file=sys.stderr)
                raise
        if procs.is_main:
            summary["energy"] = add_energy(tracker.result(), out / ENERGY_NAME, resume)
            write_json(out / "summary.json", summary)
        return summary
    finally:
        if procs.world_size > 1 and dist.is_initialized():
            # The DDP wrapper sits in reference cycles; left to interpreter exit, its gloo work is freed
            # after Python has begun shutting down, and the process aborts now and then (SIGABRT).
            gc.collect()
            dist.destroy_process_group()


def _run(config: RunConfig, procs: Processes, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    if not config.data:
        raise DistilleryError("No data given; pass --data DIR (a folder written by `distillery prepare`).")
    if not config.out:
        raise DistilleryError("No run folder given; pass --out DIR.")
    if procs.is_main:
        check_writable(out)
    # A step's big buffers (vocabulary chunks, activations) go back to the system when freed rather
    # than staying in glibc's heap (allocator.py): at the gpt2 benchmark shape the peak fell from
    # 3.38 to 2.72 GB.
    map_large_blocks(MMAP_THRESHOLD_BYTES)
    if config.objective == "embedding":
        from distillery.distill.embedding import run_embedding

        return run_embedding(config, procs, out, resume, progress)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + procs.rank)  # dropout differs between processes
    generator = torch.Generator().manual_seed(config.seed)  # the same global batches on every process

    tokenizer = load_run_tokenizer(config)
    train_data, val_data = open_data(config, tokenizer)
    teacher, cache = None, None
    if config.kind == "distill" and config.teacher_cache:
        if not config.student:
            raise DistilleryError("Distillation needs --student (a model folder) beside --teacher-cache.")
        student = load_lm(config.student)
        cache, config = open_teacher_cache(config, student, tokenizer, train_data, say=procs.is_main)
    elif config.kind == "distill":
        if not config.teacher or not config.student:
            raise DistilleryError("Distillation needs both --teacher and --student (model folders).")
        teacher, student = load_lm(config.teacher), load_lm(config.student)
        check_vocabularies(teacher, student, tokenizer)
        teacher = prepare_teacher(teacher, config.teacher_dtype, procs.device)
    else:
        if not config.model:
            raise DistilleryError("Training needs --model: a checkpoint folder or a preset such as gpt2.")
        student = build_from_preset(config.model, config.model_overrides, tokenizer) if is_preset(config.model) \
            else load_lm(config.model)
        check_model_fits_tokenizer(student, tokenizer)
    causal = student.family == "gpt2"
    if not causal and tokenizer.mask_token_id is None:
        raise DistilleryError("A masked LM needs a tokenizer with a mask token; use a RoBERTa- or BERT-style "
                              "tokenizer.")
    max_len = student.config.n_positions if causal else student.config.max_tokens
    config = default_seq_len_fitted(config, max_len, say=procs.is_main)
    check_windows(train_data, val_data, config.seq_len)
    if config.seq_len > max_len:
        raise DistilleryError(f"--seq-len {config.seq_len} exceeds the model's {max_len} positions; lower it.")
    mask_weights = None if causal else masking_weights(config, tokenizer)
    layers = resolve_layer_map(config, teacher, student) if teacher is not None else None

    student.to(procs.device).train()
    optimizer = make_optimizer(student, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    amp_dtype = autocast_dtype(config.precision, procs.device)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype == torch.float16)
    # The model the steps run: the student, compiled and/or wrapped for DDP; evaluation and
    # checkpoints use the student itself.
    model: nn.Module = compile_student(student, procs.device) if config.compile else student
    if procs.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)

    checkpoint_path = out / CHECKPOINT_NAME
    step, tokens_seen = 0, 0
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        check_resumable(checkpoint, config, tokenizer.fingerprint(), checkpoint_path)
        check_same_layout(checkpoint["model"], student, checkpoint_path)
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["rng"]  # one per process of the interrupted run
        restore_random_states(states[procs.rank] if procs.rank < len(states) else states[0], generator)
        step, tokens_seen = checkpoint["step"], checkpoint["tokens"]
    elif checkpoint_path.exists():
        raise DistilleryError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")

    weights = term_weights(config)
    rows_per_rank = config.batch_size // procs.world_size
    if rows_per_rank * procs.world_size != config.batch_size or rows_per_rank % config.grad_accum:
        raise DistilleryError(
            f"batch_size ({config.batch_size}) must split evenly over {procs.world_size} process(es) and "
            f"grad_accum ({config.grad_accum}) micro-batches; change --batch-size."
        )
    micro = rows_per_rank // config.grad_accum
    plot = plotting_available(config.plot and procs.is_main)

    # Every check is made: from here on the run folder is written.
    log = None
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # left by a process killed mid-write
            stale.unlink()
        config.save_yaml(out / CONFIG_NAME)
        log = MetricsLog(out / METRICS_NAME, step if resume else None)
    tokens_per_step = config.batch_size * config.seq_len
    bar = _progress_bar(config.max_steps, step, progress and procs.is_main)
    last_eval: float | None = None
    running: dict[str, float] = {}
    started = time.perf_counter()
    train_seconds, started_step = 0.0, step  # time in training steps only, for tokens/s

    while step < config.max_steps:
        step_started = time.perf_counter()
        if cache is None:
            windows = train_data.batch(config.batch_size, config.seq_len, generator)
        else:  # windows of the cache's enumeration, drawn by index; their teacher outputs are stored
            indices = cache.draw(config.batch_size, generator)
            windows = cache.windows(train_data.tokens, indices)
            my_targets = cache.targets(indices[procs.rank * rows_per_rank:(procs.rank + 1) * rows_per_rank])
        global_batch = make_batch(windows, causal, config, tokenizer, mask_weights, generator)
        global_counts = global_batch.position_counts()
        mine = global_batch.rows(procs.rank * rows_per_rank, (procs.rank + 1) * rows_per_rank)

        step_terms: dict[str, float] = {}
        for k in range(config.grad_accum):
            batch = mine.rows(k * micro, (k + 1) * micro).to(procs.device)
            counts = batch.position_counts()
            sync = k == config.grad_accum - 1 or procs.world_size == 1
            with (nullcontext() if sync else model.no_sync()), \
                 torch.autocast(procs.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                # Each term's share of the global mean: its positions here over all its positions.
                shares = {name: counts[TERM_POSITIONS[name]] / max(1, global_counts[TERM_POSITIONS[name]])
                          for name in weights}
                step_teacher = teacher if cache is None else my_targets.rows(k * micro, (k + 1) * micro).to(
                    procs.device)
                loss, terms = batch_loss(model, step_teacher, batch, causal, config, layers,
                                         {name: weights[name] * shares[name] for name in weights})
            # DDP averages gradients over processes; the global loss is their sum.
            scaler.scale(loss * procs.world_size).backward()
            for name, value in terms.items():
                step_terms[name] = step_terms.get(name, 0.0) + shares[name] * float(value)
            step_terms["loss"] = step_terms.get("loss", 0.0) + float(loss.detach())

        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        tokens_seen += tokens_per_step
        step_terms = _sum_over_processes(step_terms, procs)
        if not math.isfinite(step_terms["loss"]):
            # Stop before a checkpoint of broken weights replaces the last good one.
            bar.close()  # before the sentence, so that it is the last line
            raise diverged("training", step_terms["loss"], step, checkpoint_path, config)

        for name, value in step_terms.items():
            running[name] = running.get(name, 0.0) + value
        train_seconds += time.perf_counter() - step_started
        elapsed = time.perf_counter() - started
        tokens_per_s = (step - started_step) * tokens_per_step / max(train_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{step_terms['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}",
                        val_ppl="-" if last_eval is None else f"{math.exp(min(last_eval, 50)):.2f}")
        if log is not None and (step % config.log_every == 0 or step == config.max_steps):
            n = config.log_every if step % config.log_every == 0 else step % config.log_every
            record = {"step": step, **{k: v / n for k, v in running.items()},
                      "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                      "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}
            log.write(record)
            running = {}
        # Evaluated before its checkpoint, so that a NaN stops the run first. The last step is
        # evaluated after its checkpoint and the final model are written: an error there loses nothing.
        if step % config.eval_every == 0 and step != config.max_steps:
            # The main process evaluates; the sum tells every process whether to stop.
            val_loss = evaluate_loss(student, val_data, config, causal, tokenizer, mask_weights) \
                if procs.is_main else 0.0
            last_eval = _sum_over_processes({"val_loss": val_loss}, procs)["val_loss"]
            if not math.isfinite(last_eval):
                bar.close()
                raise diverged("validation", last_eval, step, checkpoint_path, config)
            if log is not None:
                log.write({"step": step, "val_loss": last_eval, "val_ppl": math.exp(min(last_eval, 50))})
        if step % config.save_every == 0 or step == config.max_steps:
            if not weights_finite(student):  # the last update broke them: keep the checkpoint before it
                bar.close()
                raise broken_weights(step, checkpoint_path, config)
            rng = _gather_random_states(random_states(generator), procs)
            if procs.is_main:
                save_checkpoint(checkpoint_path, {
                    "step": step, "tokens": tokens_seen, "config": config.identity(),
                    "tokenizer": tokenizer.fingerprint(), "model": student.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng,
                })
                if plot:
                    log.plot(out / PLOT_NAME)
    bar.close()

    named = Path(config.out)  # where the run ends up (`out` may be a folder beside it)
    summary: dict[str, Any] = {"run": str(named), "kind": config.kind, "steps": step, "tokens": tokens_seen,
                               "parameters": student.num_parameters(), "seq_len": config.seq_len}
    final = out / FINAL_MODEL_DIR
    if procs.is_main:
        student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        train_records = [r for r in log.records if "loss" in r]
        if train_records:
            summary["train_loss"] = train_records[-1]["loss"]
        summary.update(model=str(named / FINAL_MODEL_DIR), metrics=str(named / METRICS_NAME),
                       checkpoint=str(named / CHECKPOINT_NAME))
        write_json(out / "summary.json", summary)  # before the final evaluation: an error there loses nothing
    val_loss = evaluate_loss(student, val_data, config, causal, tokenizer, mask_weights) if procs.is_main else 0.0
    last_eval = _sum_over_processes({"val_loss": val_loss}, procs)["val_loss"]
    if not math.isfinite(last_eval):
        raise diverged("validation", last_eval, step, checkpoint_path, config,
                       kept=f"the weights of that step, all finite, are in {final}")
    if procs.is_main:
        if not any(r["step"] == step and "val_loss" in r for r in log.records):  # a finished run resumed
            log.write({"step": step, "val_loss": last_eval, "val_ppl": math.exp(min(last_eval, 50))})
        summary.update(val_loss=last_eval, val_ppl=math.exp(min(last_eval, 50)))
        write_json(out / "summary.json", summary)
        if plot:
            log.plot(out / PLOT_NAME)
    return summary


def diverged(loss: str, value: float, step: int, checkpoint_path: Path, config: RunConfig,
             kept: str | None = None) -> DistilleryError:
    """The sentence that stops a run whose `loss` ("training" or "validation") is NaN or infinite,
    raised before a checkpoint or model of the broken weights replaces the last good one; `kept`
    says what was saved when that is not the last checkpoint."""
    if kept is None:
        kept = f"{checkpoint_path} keeps the last good step" if checkpoint_path.exists() else "nothing was saved yet"
    data = "the data" if loss == "training" else "the validation data"
    return DistilleryError(f"The {loss} loss became {value} at step {step} ({kept}); lower --lr (now {config.lr:g}) "
                           f"or check {data}, and {resume_flags(checkpoint_path, config)} or start again.")


def broken_weights(step: int, checkpoint_path: Path, config: RunConfig) -> DistilleryError:
    """The sentence that stops a run whose weights became NaN or infinite, before they are saved."""
    return DistilleryError(f"The weights became NaN or infinite by step {step} ({checkpoint_path} keeps the last "
                           f"good step, if any); lower --lr (now {config.lr:g}) and start again or "
                           f"{resume_flags(checkpoint_path, config)}.")


def resume_flags(checkpoint_path: Path, config: RunConfig) -> str:
    """How to continue the run whose checkpoint is `checkpoint_path`: an --overwrite run is written
    beside config.out and continued with --overwrite --resume."""
    staged = config.out and checkpoint_path.parent.resolve() != Path(config.out).resolve()
    return "--overwrite --resume" if staged else "--resume"


def add_energy(segment: dict[str, Any], path: Path, resume: bool) -> dict[str, Any]:
    """This process's energy use, added to the run's earlier segments (resumed runs) in `path`.

    Counts this machine only (the main process); a run killed before it ends loses that segment.
    """
    total = dict(segment)
    if resume and path.is_file():
        earlier = json.loads(path.read_text())
        for key in ("hours", "kwh", "kg_co2eq"):
            total[key] = earlier.get(key, 0.0) + segment[key]
        total["segments"] = earlier.get("segments", 1) + 1
    write_json(path, total)
    return total


def _sum_over_processes(values: dict[str, float], procs: Processes) -> dict[str, float]:
    if procs.world_size == 1:
        return values
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=procs.device)
    dist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def _gather_random_states(states: dict[str, Any], procs: Processes) -> list[dict[str, Any]]:
    """Every process's random states, indexed by rank (each process resumes its own dropout stream)."""
    if procs.world_size == 1:
        return [states]
    gathered: list[Any] = [None] * procs.world_size
    dist.all_gather_object(gathered, states)
    return gathered


def _progress_bar(total: int, initial: int, enabled: bool, desc: str = "train", unit: str = "step"):
    """A tqdm bar on stderr; a silent one (every call a no-op) when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=not enabled)
