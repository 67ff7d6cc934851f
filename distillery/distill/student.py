"""A student initialised from its teacher: same family, task and width, fewer layers.

DistilBERT, DistilGPT2 and DistilRoBERTa all start their student from the teacher itself: the
embeddings, one block in two, the final LayerNorm and the heads, copied as they are. A student
that starts where the teacher is learns much faster than one that starts from random weights.
"""

from __future__ import annotations

import dataclasses
import re

from distillery.models.checkpoint import build_model
from distillery.models.common import DistilleryError, Pretrained, plural

# Where each family keeps its stack of blocks, as a state-dict key prefix.
BLOCK_KEY = {
    "gpt2": re.compile(r"^(blocks\.)(\d+)(\..*)$"),
    "roberta": re.compile(r"^((?:roberta\.)?layers\.)(\d+)(\..*)$"),
    "bert": re.compile(r"^((?:bert\.)?layers\.)(\d+)(\..*)$"),
    "distilbert": re.compile(r"^((?:distilbert\.)?layers\.)(\d+)(\..*)$"),
}
# The config field that holds each family's number of blocks.
LAYER_FIELD = {"gpt2": "n_layer", "roberta": "num_hidden_layers", "bert": "num_hidden_layers",
               "distilbert": "n_layers"}


def default_student_layers(n_teacher_layers: int) -> list[int]:
    """Teacher layers a half-depth student keeps: 12 -> [0, 2, 4, 7, 9, 11].

    ceil(n / 2) layers spread evenly over the teacher's depth, first and last included:
    layer i of the student is teacher layer round_half_up(i * (n - 1) / (k - 1)). For 12 this is
    exactly the DistilBERT / DistilGPT2 / DistilRoBERTa choice; for 24 it gives
    [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]. A 1- or 2-layer teacher gives [0].
    """
    if n_teacher_layers < 1:
        raise ValueError(f"a teacher has at least one layer, got {n_teacher_layers}.")
    k = (n_teacher_layers + 1) // 2
    if k == 1:
        return [0]
    # i * (n - 1) / (k - 1) + 1/2, floored, in integers: exact, no banker's rounding.
    return [(2 * i * (n_teacher_layers - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def check_student_layers(layers: list[int], n_teacher_layers: int) -> None:
    """Raise DistilleryError unless `layers` are distinct teacher layer indices in increasing order."""
    if not layers:
        raise DistilleryError("--layers is empty; name at least one teacher layer, e.g. --layers 0,2,4.")
    if len(layers) > n_teacher_layers:
        raise DistilleryError(
            f"--layers names {plural(len(layers), 'layer')} but the teacher has only {n_teacher_layers}; a student "
            "keeps at most as many layers as its teacher."
        )
    bad = [i for i in layers if not 0 <= i < n_teacher_layers]
    if bad:
        raise DistilleryError(
            f"--layers names layer {bad[0]}, but the teacher has layers 0 to {n_teacher_layers - 1}; "
            "pick indices in that range."
        )
    if len(set(layers)) != len(layers):
        raise DistilleryError(f"--layers {layers} repeats a layer; name each teacher layer at most once.")
    if layers != sorted(layers):
        raise DistilleryError(
            f"--layers {layers} is not in increasing order; the student keeps the teacher's order, "
            f"so write {sorted(layers)}."
        )


def parse_layers(text: str, flag: str = "--layers") -> list[int]:
    """'0,2,4' -> [0, 2, 4], with a DistilleryError naming the flag for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DistilleryError(
            f"{flag} {text!r} is not a comma-separated list of layer numbers, e.g. 0,2,4,7,9,11."
        ) from None


def make_student(teacher: Pretrained, layers: list[int] | None = None) -> Pretrained:
    """A new model of the teacher's family and task with the teacher's blocks `layers`, in order.

    Everything outside the block stack (embeddings, GPT-2's final LayerNorm, the pooler and the
    task heads) is copied; tied weights stay tied. The student's config records the teacher
    layers it came from in `teacher_layers` (kept in config.json), so a per-layer hidden-state
    loss can pair student layer i with teacher layer teacher_layers[i]. The student has the
    teacher's dtype and device and is in training mode.
    """
    n = teacher.config.num_layers
    layers = list(layers) if layers is not None else default_student_layers(n)
    check_student_layers(layers, n)
    extra = {**teacher.config.extra, "teacher_layers": layers}
    config = dataclasses.replace(teacher.config, **{LAYER_FIELD[teacher.family]: len(layers)}, extra=extra)
    student = build_model(config, teacher.task)

    student_of_teacher = {t: s for s, t in enumerate(layers)}
    pattern = BLOCK_KEY[teacher.family]
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = tensor
        elif int(match[2]) in student_of_teacher:
            state[f"{match[1]}{student_of_teacher[int(match[2])]}{match[3]}"] = tensor
    student.load_state_dict(state, strict=True)
    return student.to(device=teacher.device, dtype=teacher.dtype).train()


def teacher_layers_of(student: Pretrained) -> list[int]:
    """The teacher layer each student layer was copied from (`teacher_layers` in its config)."""
    layers = student.config.extra.get("teacher_layers")
    if layers is None:
        raise DistilleryError(
            "the student's config.json has no teacher_layers; make it with `distillery student` "
            "or compare only the last hidden states."
        )
    return [int(i) for i in layers]

