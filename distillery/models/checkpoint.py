"""Loading and saving Hugging Face checkpoints: the one boundary where their layout meets ours.

A checkpoint is a folder with config.json (model_type, architectures) and weights in
model.safetensors, pytorch_model.bin, or shards listed by a `*.index.json`. A name that is not a
folder is a hub id, resolved through huggingface_hub's cache (offline when it is cached).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillery.models import bert, distilbert, gpt2, roberta
from distillery.models.common import (
    ConfigError,
    DistilleryError,
    Pretrained,
    is_int,
    is_number,
    plural,
    read_json_object,
)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Files worth fetching from a hub repo: config, weights and tokenizer (never code).
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json",
]


@dataclass(frozen=True)
class Family:
    """What the checkpoint boundary knows of one model family; the family's file knows the rest."""

    config: type  # the config dataclass, with from_hf / to_hf
    heads: dict[str, type[Pretrained]]  # task -> model class; the first is a checkpoint's default
    architectures: dict[str, str]  # transformers class -> task; the first per task is written on save
    hf_to_ours: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]  # (state, task)
    ours_to_hf: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
    presets: dict[str, dict[str, Any]]  # name -> config fields (config.from_preset builds them)
    # Our key prefixes that belong to a head: absent from a checkpoint of another head (initialised
    # afresh) or present for a head we do not build (dropped). Everything else must match exactly.
    head_keys: tuple[str, ...] = ()
    new_model_task: str = ""  # what build_model makes when no task is named


def _encoder_architectures(prefix: str) -> dict[str, str]:
    """transformers' names for the five encoder heads: RobertaModel, RobertaForMaskedLM, ..."""
    return {f"{prefix}Model": "base", f"{prefix}ForMaskedLM": "masked-lm",
            f"{prefix}ForSequenceClassification": "sequence-classification",
            f"{prefix}ForTokenClassification": "token-classification",
            f"{prefix}ForQuestionAnswering": "question-answering"}


# model_type -> family: adding a family touches this table and the family's own file.
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        gpt2.GPT2Config, {"causal-lm": gpt2.GPT2},
        {"GPT2LMHeadModel": "causal-lm", "GPT2Model": "causal-lm"},
        lambda state, task: gpt2.hf_to_ours(state), lambda state, task: gpt2.ours_to_hf(state), gpt2.GPT2_PRESETS,
        new_model_task="causal-lm",
    ),
    "roberta": Family(
        roberta.RobertaConfig, roberta.HEADS, _encoder_architectures("Roberta"),
        roberta.hf_to_ours, roberta.ours_to_hf, roberta.ROBERTA_PRESETS,
        head_keys=("lm_dense.", "lm_ln.", "lm_decoder.", "cls_dense.", "cls_out.", "qa_out.", "pooler."),
        new_model_task="masked-lm",
    ),
    "bert": Family(
        bert.BertConfig, bert.HEADS, {**_encoder_architectures("Bert"), "BertForPreTraining": "masked-lm"},
        bert.hf_to_ours, bert.ours_to_hf, bert.BERT_PRESETS, head_keys=bert.HEAD_KEYS, new_model_task="masked-lm",
    ),
    "distilbert": Family(
        distilbert.DistilBertConfig, distilbert.HEADS, _encoder_architectures("DistilBert"),
        distilbert.hf_to_ours, distilbert.ours_to_hf, distilbert.DISTILBERT_PRESETS, head_keys=distilbert.HEAD_KEYS,
        new_model_task="masked-lm",
    ),
}
# The same table seen from transformers' class names and from our (family, task) pairs.
ARCHITECTURE_TASKS = {arch: (fam, task) for fam, f in FAMILIES.items() for arch, task in f.architectures.items()}
TASK_ARCHITECTURES: dict[tuple[str, str], str] = {}
for _arch, _key in ARCHITECTURE_TASKS.items():
    TASK_ARCHITECTURES.setdefault(_key, _arch)
FAMILY_TASKS = {fam: list(f.heads) for fam, f in FAMILIES.items()}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(DistilleryError):
    """A checkpoint that cannot be read, named with the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Finding the folder


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, from huggingface_hub's cache or the hub."""
    if not str(name_or_path).strip():  # Path("") is the working folder, which is never meant
        raise CheckpointError("The model is an empty name; pass a model folder or a hub id.")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name:
        raise CheckpointError(f"No such model folder: {path}; check the path.")
    return _from_hub(name)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a valid hub model id.") from e
    except Exception as cached_error:  # noqa: BLE001 - any cache miss falls through to the hub
        if _offline():
            raise CheckpointError(
                f"Model {repo_id!r} is not a local folder and is not in the Hugging Face cache, and "
                "offline mode is on (HF_HUB_OFFLINE); download it where there is network "
                f"(`hf download {repo_id}`) or pass a local folder."
            ) from cached_error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        raise CheckpointError(
            f"Model {repo_id!r} is not a local folder, not in the Hugging Face cache, and the hub "
            f"could not provide it ({type(e).__name__}); download it where there is network "
            f"(`hf download {repo_id}`) or pass a local folder."
        ) from e


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------
# Reading


def read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        if (directory / "model" / CONFIG_NAME).is_file():  # a training run's folder: its model is in model/
            raise CheckpointError(f"{directory} has no {CONFIG_NAME} but holds a trained model; pass "
                                  f"{directory / 'model'} instead.")
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; a model folder needs one (save it with "
                              "save_pretrained).")
    return read_json_object(file, CheckpointError)


def family_and_task(config: dict[str, Any], file: Path, task: str | None) -> tuple[str, str]:
    model_type = config.get("model_type")
    if model_type not in FAMILY_TASKS:
        raise CheckpointError(
            f"{file}: model_type {model_type!r} is not supported; distillery runs {sorted(FAMILY_TASKS)}."
        )
    stored = None
    for arch in config.get("architectures") or []:
        if arch in ARCHITECTURE_TASKS and ARCHITECTURE_TASKS[arch][0] == model_type:
            stored = ARCHITECTURE_TASKS[arch][1]
    chosen = task or stored or FAMILY_TASKS[model_type][0]
    if chosen not in FAMILY_TASKS[model_type]:
        raise CheckpointError(
            f"task {chosen!r} does not exist for {model_type} models; choose one of {FAMILY_TASKS[model_type]}."
        )
    return model_type, chosen


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `directory`, in its own (Hugging Face) naming."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index (needs 'weight_map').") from e
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_file(directory / shard))
            return state
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (directory / name).is_file():
            return _read_file(directory / name)
    raise CheckpointError(
        f"{directory} has no weights: expected {SAFETENSORS_NAME}, {BIN_NAME} or a sharded *.index.json."
    )


def _read_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"Weight file {file} is missing (listed in the shard index); re-download it.")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt: {e}); re-download or "
                "re-save it."
            ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {file}: it holds objects other than tensors (possibly code), and distillery "
            "loads .bin files only with weights_only=True; convert it to safetensors from a trusted source."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable PyTorch weight file ({e}); re-download it.") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict of tensors.")
    return state


# ----------------------------------------------------------------------------------------------
# Building and filling a model


def config_from_hf(family: str, hf: dict[str, Any]):
    config = FAMILIES[family].config.from_hf(hf)
    check_field_kinds(config)
    return config


def check_field_kinds(config) -> None:
    """Every bool, int, float and str field holds a value of its default's kind: config.json's
    `"layer_norm_epsilon": "1e-5"` would otherwise load and fail deep inside the first forward
    pass, and only for the commands that run one."""
    import dataclasses

    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    for f in dataclasses.fields(config):
        kind, value = type(f.default), getattr(config, f.name)
        if kind not in names or value is None:
            continue
        fits = is_number(value) if kind is float else is_int(value) if kind is int else isinstance(value, kind)
        if not fits:
            raise ConfigError(f"{type(config).__name__}.{f.name} must be {names[kind]}, got {value!r}.")


def family_of_config(config) -> str:
    """The model_type of a config object (GPT2Config -> "gpt2", BertConfig -> "bert", ...)."""
    for family, f in FAMILIES.items():
        if type(config) is f.config:
            return family
    raise CheckpointError(f"{type(config).__name__} is not a distillery model config; pass one of "
                          f"{[f.config.__name__ for f in FAMILIES.values()]}.")


def build_model(config, task: str | None = None) -> Pretrained:
    """A freshly initialised model for a config (GPT2Config, RobertaConfig, BertConfig, DistilBertConfig)
    and a task; without a task, causal-lm for GPT-2 and masked-lm for the encoders."""
    family = family_of_config(config)
    heads = FAMILIES[family].heads
    task = task or FAMILIES[family].new_model_task
    if task not in heads:
        raise CheckpointError(f"task {task!r} does not exist for {family} models; choose one of {list(heads)}.")
    return heads[task](config)


def preset_config(name: str, **overrides: Any):
    """The config of a named preset of any family ("distilgpt2", "bert-base-uncased", ...)."""
    for f in FAMILIES.values():
        if name in f.presets:
            return f.config.from_preset(name, **overrides)
    raise CheckpointError(f"Unknown preset {name!r}; choose one of {preset_names()}.")


def preset_names() -> list[str]:
    """Every preset name, family by family."""
    return [name for f in FAMILIES.values() for name in sorted(f.presets)]


def to_ours(family: str, task: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return FAMILIES[family].hf_to_ours(state, task)


def to_hf(model: Pretrained) -> dict[str, torch.Tensor]:
    return FAMILIES[model.family].ours_to_hf(model.state_dict(), model.task)


def load_model(
    name_or_path: str | os.PathLike,
    task: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Pretrained:
    """Load a GPT-2, RoBERTa, BERT or DistilBERT checkpoint (local folder or hub id) into a distillery model.

    `task` picks an encoder's head ("base", "masked-lm", "sequence-classification", ...); by default the
    one config.json's architectures name. A head the checkpoint lacks is freshly initialised (as
    when fine-tuning a masked LM for classification); any other missing, unexpected or mis-shaped
    tensor is an error naming it.
    """
    directory = resolve_model_dir(name_or_path)
    hf_config = read_config(directory)
    family, task = family_and_task(hf_config, directory / CONFIG_NAME, task)
    try:
        config = config_from_hf(family, hf_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from e
    their_state = read_state_dict(directory)
    model = build_model(config, task)
    load_hf_state_dict(model, their_state, source=directory)
    model.eval()
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.to(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def load_hf_state_dict(model: Pretrained, their_state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy a Hugging Face-layout state dict into `model`, naming every key that does not fit."""
    family, task = model.family, model.task
    head_keys = FAMILIES[family].head_keys
    for key, tensor in their_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is not a tensor.")
    ours = to_ours(family, task, their_state)  # whole: the encoders stack query, key and value

    def their_name(name: str) -> str:
        """The checkpoint's key behind one of ours, for error messages (ours for a stacked tensor)."""
        return next((key for key, t in their_state.items() if name in to_ours(family, task, {key: t})), name)

    expected = model.state_dict()
    # Tied weights appear once in the checkpoint.
    tied = {"lm_head.weight", "lm_decoder.weight"}
    missing = [k for k in expected if k not in ours and k not in tied]
    unexpected = [k for k in ours if k not in expected]
    # An encoder checkpoint of another head: keep the encoder, initialise our head, drop theirs.
    new_head = [k for k in missing if k.startswith(head_keys)]
    missing = [k for k in missing if k not in new_head]
    dropped = [k for k in unexpected if k.startswith(head_keys)]
    unexpected = [k for k in unexpected if k not in dropped]
    if missing:
        raise CheckpointError(
            f"{source}: the checkpoint lacks {plural(len(missing), 'tensor')} a {family} {task} model needs, e.g. "
            f"{', '.join(missing[:3])}; is it a complete {family} checkpoint?"
        )
    if unexpected:
        names = ", ".join(their_name(k) for k in unexpected[:3])
        raise CheckpointError(
            f"{source}: the checkpoint has {plural(len(unexpected), 'tensor')} a {family} {task} model does not use, "
            f"e.g. {names}; does config.json match the weights?"
        )
    for name, tensor in ours.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {their_name(name)} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected[name].shape)}; the weights and config.json do not match."
            )
        # NaN or infinite weights make every output NaN, silently; one pass over the weights says so at load.
        # A float64 sum is non-finite exactly when an element is (it cannot overflow on weights),
        # and costs a read where isfinite().all() also writes a mask: 0.15 against 0.20 s for GPT-2 small.
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            raise CheckpointError(f"{source}: tensor {their_name(name)} holds NaN or infinite values; the checkpoint "
                                  "is broken (a diverged run?), so use an earlier one.")
    model.load_state_dict({k: v for k, v in ours.items() if k in expected}, strict=False)
    if new_head:
        model.newly_initialized = new_head  # reported by callers that fine-tune


# ----------------------------------------------------------------------------------------------
# Saving


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Write to a temporary file beside `path`, then rename over it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give what open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)  # paths (typed CLI options) as text
        f.write("\n")


def save_pretrained(model: Pretrained, directory: str | os.PathLike) -> None:
    """config.json + model.safetensors in transformers' layout, each written atomically."""
    from safetensors.torch import save

    if any(getattr(m, "inference_only", False) or type(m).__module__.startswith("torch.ao.nn.quantized")
           for m in model.modules()):
        raise CheckpointError("This model was converted for inference (int8 or decode-layout weights) and cannot "
                              "be saved; save the float model it was made from instead.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf()
    hf_config["architectures"] = [TASK_ARCHITECTURES[(model.family, model.task)]]
    hf_config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    state = {k: v.detach().cpu().contiguous() for k, v in to_hf(model).items()}
    blob = save(state, metadata={"format": "pt"})
    with atomic_write(directory / SAFETENSORS_NAME) as f:
        f.write(blob)
    write_json(directory / CONFIG_NAME, hf_config)
