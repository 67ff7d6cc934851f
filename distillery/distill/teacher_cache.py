"""The offline teacher: a causal LM's top-k next-token distributions, computed once and memory-mapped.

`build_cache` runs the teacher over a fixed enumeration of the training split's windows and keeps,
per input position, the k most likely next tokens and their log-probabilities, plus the log of the
probability mass left outside them; optionally the teacher's last hidden state for the cosine loss.
`distillery distill --teacher-cache DIR` then trains without loading the teacher: each step draws
its windows *from that enumeration* (window indices from the run's generator, as
`TokenDataset.batch` draws random offsets) and uses `sparse_kd_loss` on the stored ids.

The windows: window i covers train tokens [i * seq_len, (i + 1) * seq_len] (seq_len + 1 tokens,
as `TokenDataset.iter_sequential` cuts them), so the teacher sees every training token once as
an input; `windows` may keep only the first N, and a run from such a cache sees only those (a
narrower sample than online distillation's random offsets over the whole split).

The folder:
    meta.json                         what the cache was made from and how (checked before use)
    shard-NNNNN.ids.npy               (n, seq_len, k) token ids, uint16 (vocabulary <= 65536) or int32
    shard-NNNNN.logprobs.npy          (n, seq_len, k) log p_t of those ids at T = 1, float16 or float32
    shard-NNNNN.tail.npy              (n, seq_len) float32, log(1 - sum of those k probabilities)
    shard-NNNNN.hidden.npy            (n, seq_len, C) float16, the last hidden state (with --hidden)
Shard s holds windows [s * shard_windows, (s + 1) * shard_windows). Each file is written to a
temporary name and renamed, so a shard is finished when all its files exist: a rerun skips those
and redoes the rest (resumable). Under torchrun, process r of W computes the shards s with
s % W == r; the names do not depend on W, so a build may be resumed with another process count.

Bytes per token: k * (2 or 4) ids + k * (2 or 4) log-probs + 4 tail (+ 2 C hidden). For GPT-2's
vocabulary at k = 64 with float16 log-probs: 128 + 128 + 4 = 260 bytes; the hidden states of a
768-wide teacher add 1536. float16 keeps a log-probability to within 2^-11 of its size: on the
books teacher of bench/distil_books.sh (6 x 256, 8192 tokens, 8 windows of 128) the top-64 were off
by at most 0.004 nats, and the sparse KD loss moved by under 1e-5 (0.09372 both ways at T = 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillery.models.common import DistilleryError, read_json

FORMAT = "distillery-teacher-cache"
VERSION = 1
META_NAME = "meta.json"
DEFAULT_SHARD_WINDOWS = 256
LOGPROB_DTYPES = ("float16", "float32")
# The log of an empty "other" bucket (the k ids hold all the student's mass): e^-10000 is 0, and
# finite, so that its gradient stays finite.
EMPTY_TAIL_LOG = -1e4
FINGERPRINT_BYTES = 1 << 20  # how much of each weights file (and of train.bin's ends) is hashed
# The settings that define what a cache holds: a rerun with all of them equal resumes the build.
IDENTITY = ("format", "version", "teacher_fingerprint", "tokenizer_fingerprint", "data_fingerprint", "seq_len",
            "top_k", "vocab_size", "windows", "shard_windows", "ids_dtype", "logprob_dtype", "hidden",
            "hidden_size")


# ----------------------------------------------------------------------------------------------
# The sparse soft-target loss


def sparse_kd_loss(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
                   teacher_tail: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL against a teacher known by its top-k: the k stored ids plus one "other" bucket.

    Both distributions are first coarsened to k + 1 buckets at T = 1, then softened. With teacher
    log-probabilities l_1..l_k of ids y_1..y_k and tail r = log(1 - sum_i e^l_i), and
    z = log_softmax(s) the student's:

        a_t = [l_1, ..., l_k, r]                                  teacher's buckets (log, T = 1)
        a_s = [z_y1, ..., z_yk, log(1 - sum_i e^z_yi)]            student's same buckets
        q_t = softmax(a_t / T),  q_s = softmax(a_s / T)
        loss = T^2 * mean_positions sum_j q_t,j (log q_t,j - log q_s,j)

    At T = 1 this is exactly KL between the coarsened distributions: a lower bound of the full KL,
    equal to it when the teacher puts nothing outside its top k. At T != 1 the "other" bucket is
    softened as if it were one token, on both sides alike (softening the whole vocabulary would
    give the tail far more weight, sum_v p_v^(1/T), which the cache cannot know for the teacher);
    with k = V (tail = -inf) the loss equals `losses.soft_target_kl` at every T. The stored
    log-probs are renormalised over the buckets, which also absorbs float16 rounding.

    student_logits (B, T, V) or (N, V); teacher_ids, teacher_logprobs (..., k); teacher_tail (...).
    """
    V = student_logits.size(-1)
    k = teacher_ids.size(-1)
    per_row = sparse_kd_rows(student_logits.reshape(-1, V), teacher_ids.reshape(-1, k),
                             teacher_logprobs.reshape(-1, k), teacher_tail.reshape(-1), temperature)
    return temperature**2 * per_row.sum() / max(per_row.numel(), 1)


def sparse_kd_rows(s: torch.Tensor, ids: torch.Tensor, l_t: torch.Tensor, tail_t: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """KL(q_t || q_s) per row (no T^2) of `sparse_kd_loss`, on flat (N, V) logits and (N, k), (N,) targets."""
    ids = ids.long()
    z = torch.log_softmax(s.float(), dim=-1)
    # The student's mass outside the k ids, as a logsumexp of the rest (1 - sum loses digits when the
    # top k hold nearly everything); a finite floor keeps the gradient finite at k = V.
    rest = z.scatter(-1, ids, EMPTY_TAIL_LOG)
    a_s = torch.cat([z.gather(-1, ids), torch.logsumexp(rest, dim=-1, keepdim=True)], dim=-1)
    return bucket_kl(a_s, l_t, tail_t, temperature)[0]


def bucket_kl(student_buckets: torch.Tensor, l_t: torch.Tensor, tail_t: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL(q_t || q_s) per row, q_s, q_t) over the k + 1 buckets of `sparse_kd_loss`, from the
    student's log bucket masses at T = 1 (N, k + 1) and the teacher's stored (N, k) log-probs and
    (N,) tail. The KL's gradient with respect to the student's log masses is (q_s - q_t) / T."""
    log_q_t = torch.log_softmax(torch.cat([l_t.float(), tail_t.float()[:, None]], dim=-1) / temperature, dim=-1)
    log_q_s = torch.log_softmax(student_buckets / temperature, dim=-1)
    q_t = log_q_t.exp()
    kl = (q_t * (log_q_t - log_q_s)).masked_fill(q_t == 0, 0.0).sum(-1)
    return kl, log_q_s.exp(), q_t


# ----------------------------------------------------------------------------------------------
# Fingerprints


def _sha256_file_parts(h, path: Path, ends: bool = False) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if ends and size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read())


def teacher_fingerprint(directory: Path) -> str:
    """sha256 of config.json and of each weights file's name, size and first MiB."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".bin") and path.is_file():
            _sha256_file_parts(h, path)
    return h.hexdigest()


def data_fingerprint(meta: dict[str, Any]) -> str:
    """sha256 of the prepared data's meta.json (its folder left out) and train.bin's size, first and last MiB."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "path"}, sort_keys=True).encode())
    _sha256_file_parts(h, Path(meta["path"]) / "train.bin", ends=True)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading a cache


@dataclass
class CachedTargets:
    """The stored teacher outputs of a (micro-)batch of windows; what `batch_loss` takes in place of
    a teacher model."""

    ids: torch.Tensor  # (B, T, k)
    logprobs: torch.Tensor  # (B, T, k)
    tail: torch.Tensor  # (B, T)
    hidden: torch.Tensor | None  # (B, T, C)

    def rows(self, start: int, end: int) -> CachedTargets:
        return CachedTargets(self.ids[start:end], self.logprobs[start:end], self.tail[start:end],
                             self.hidden[start:end] if self.hidden is not None else None)

    def to(self, device: torch.device) -> CachedTargets:
        from distillery.distill.trainer import host_to_device

        return CachedTargets(*(host_to_device(x, device) for x in (self.ids, self.logprobs, self.tail)),
                             host_to_device(self.hidden, device) if self.hidden is not None else None)


class TeacherCache:
    """A finished cache folder, its shards memory-mapped on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path, "--teacher-cache")
        if not self.meta.get("complete"):
            raise DistilleryError(f"The teacher cache {self.path} is unfinished; rerun the same `distillery "
                                  "teacher-cache` command to complete it.")
        self.seq_len, self.top_k = self.meta["seq_len"], self.meta["top_k"]
        self.n_windows, self.shard_windows = self.meta["windows"], self.meta["shard_windows"]
        self.has_hidden = bool(self.meta["hidden"])
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def check_run(self, data_meta: dict[str, Any], tokenizer_fingerprint: str, seq_len: int,
                  vocab_size: int) -> None:
        """Refuse, in one sentence, a run whose tokenizer, data, sequence length or vocabulary differ."""
        where = f"The teacher cache {self.path}"
        if self.meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise DistilleryError(f"{where} was made with another tokenizer than this run's; distil with the "
                                  "tokenizer it was made with or rebuild the cache.")
        if self.meta["data_fingerprint"] != data_fingerprint(data_meta):
            raise DistilleryError(f"{where} was made from other data than --data {data_meta['path']} (it was "
                                  f"made from {self.meta['data']}); pass that data or rebuild the cache.")
        if self.seq_len != seq_len:
            raise DistilleryError(f"{where} holds windows of --seq-len {self.seq_len}, not {seq_len}; pass "
                                  f"--seq-len {self.seq_len} or rebuild the cache.")
        if self.meta["vocab_size"] != vocab_size:
            raise DistilleryError(f"{where} comes from a teacher of {self.meta['vocab_size']} tokens but the "
                                  f"student has {vocab_size}; make the student from that teacher.")

    def draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """batch_size window indices, uniformly with replacement (as TokenDataset.batch draws offsets)."""
        return torch.randint(0, self.n_windows, (batch_size,), generator=generator)

    def windows(self, tokens: np.ndarray, indices: torch.Tensor) -> torch.Tensor:
        """(B, seq_len + 1) token windows of the train split for these indices."""
        L = self.seq_len
        return torch.from_numpy(np.stack([np.asarray(tokens[i * L:(i + 1) * L + 1], dtype=np.int64)
                                          for i in indices.tolist()]))

    def targets(self, indices: torch.Tensor) -> CachedTargets:
        rows = [self._row(i) for i in indices.tolist()]
        stack = {name: torch.from_numpy(np.stack([r[name] for r in rows])) for name in rows[0]}
        return CachedTargets(stack["ids"], stack["logprobs"], stack["tail"], stack.get("hidden"))

    def _row(self, window: int) -> dict[str, np.ndarray]:
        s, j = divmod(window, self.shard_windows)
        if s not in self._shards:
            self._shards[s] = {part: np.load(shard_file(self.path, s, part), mmap_mode="r")
                               for part in shard_parts(self.has_hidden)}
        # int64 (not uint16) ids and float32 values: what torch gathers and computes with.
        return {part: np.asarray(a[j], dtype=np.int64 if part == "ids" else np.float32)
                for part, a in self._shards[s].items()}


def read_meta(path: Path, flag: str) -> dict[str, Any]:
    file = path / META_NAME
    if not file.is_file():
        raise DistilleryError(f"{flag} {path} holds no teacher cache ({META_NAME} is missing); make one with "
                              "`distillery teacher-cache TEACHER --data DIR --out CACHE`.")
    meta = read_json(file, fix="rebuild the cache with --overwrite")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DistilleryError(f"{flag} {path} is not a teacher cache ({file} is not of distillery teacher-cache "
                              f"version {VERSION}); pass a folder made by `distillery teacher-cache`.")
    return meta


def shard_parts(hidden: bool) -> tuple[str, ...]:
    return ("ids", "logprobs", "hidden", "tail") if hidden else ("ids", "logprobs", "tail")


def shard_file(folder: Path, shard: int, part: str) -> Path:
    return folder / f"shard-{shard:05d}.{part}.npy"


# ----------------------------------------------------------------------------------------------
# Building a cache


def build_cache(teacher: str, data: str | os.PathLike, out: str | os.PathLike, top_k: int,
                seq_len: int | None = None, hidden: bool = False, logprob_dtype: str = "float16",
                windows: int | None = None, batch_size: int = 8, shard_windows: int = DEFAULT_SHARD_WINDOWS,
                device: str = "auto", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run `teacher` over the train split's windows of `data` into a cache in `out` (module docstring).

    Resumes a build of the same settings in `out`; another cache there is replaced only with
    `overwrite`. Under torchrun each process computes its share of the shards. Returns a summary.
    """
    from distillery.distill.data import TokenDataset
    from distillery.distill.run_config import DEFAULT_SEQ_LEN
    from distillery.distill.trainer import _progress_bar, load_lm, start_processes
    from distillery.models.checkpoint import resolve_model_dir

    assert logprob_dtype in LOGPROB_DTYPES, logprob_dtype
    out = Path(out)
    train = TokenDataset(data, "train")
    directory = resolve_model_dir(teacher)
    model = load_lm(str(directory))
    if model.family != "gpt2":
        raise DistilleryError(f"The teacher {teacher} is a {model.family} masked LM; a teacher cache holds a causal "
                              "LM's next-token distributions (a masked LM's targets depend on each step's random "
                              "masking), so distil it online, as the teacher of `distillery distill`.")
    V = model.config.vocab_size
    if train.meta["vocab_size"] > V:
        raise DistilleryError(f"--data {data} was prepared with a tokenizer of {train.meta['vocab_size']} tokens but "
                              f"the teacher has {V}; prepare the data with the teacher's tokenizer.")
    if not 1 <= top_k <= V:
        raise DistilleryError(f"--top-k {top_k} must lie between 1 and the teacher's vocabulary of {V} tokens.")
    positions = model.config.n_positions
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, positions)
    if seq_len > positions:
        raise DistilleryError(f"--seq-len {seq_len} exceeds the teacher's {positions} positions; lower it.")
    train.check_fits(seq_len)
    n_windows = (len(train) - 1) // seq_len
    n_windows = min(n_windows, windows) if windows else n_windows
    meta = {
        "format": FORMAT, "version": VERSION,
        "teacher": str(teacher), "teacher_fingerprint": teacher_fingerprint(directory),
        "tokenizer_fingerprint": train.meta["tokenizer_fingerprint"],
        "data": str(data), "data_fingerprint": data_fingerprint(train.meta),
        "split": "train", "enumeration": "window i = train tokens [i * seq_len, (i + 1) * seq_len]",
        "seq_len": seq_len, "top_k": top_k, "vocab_size": V, "windows": n_windows,
        "shard_windows": shard_windows, "shards": math.ceil(n_windows / shard_windows),
        "ids_dtype": "uint16" if V <= 1 << 16 else "int32", "logprob_dtype": logprob_dtype,
        "hidden": hidden, "hidden_size": model.config.n_embd if hidden else None,
    }
    meta["bytes_per_token"] = bytes_per_token(meta)
    procs = start_processes(device)
    try:
        if procs.is_main:
            start_folder(out, meta, overwrite)
        _barrier(procs)
        model.to(procs.device).eval().requires_grad_(False)
        started = time.perf_counter()
        mine = [s for s in range(meta["shards"]) if s % procs.world_size == procs.rank]
        todo = [s for s in mine if not all(shard_file(out, s, p).is_file() for p in shard_parts(hidden))]
        total = sum(_shard_range(meta, s)[1] - _shard_range(meta, s)[0] for s in todo)
        bar = _progress_bar(total, 0, progress and procs.is_main and total > 0, desc="teacher-cache", unit="window")
        for s in todo:
            write_shard(model, train.tokens, out, s, meta, batch_size, procs.device, bar)
        bar.close()
        _barrier(procs)
        if procs.is_main:
            from distillery.models.checkpoint import write_json

            write_json(out / META_NAME, {**meta, "complete": True})
        seconds = time.perf_counter() - started
    finally:
        if procs.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return {"cache": str(out), "windows": n_windows, "tokens": n_windows * seq_len, "shards": meta["shards"],
            "shards_computed": len(todo), "top_k": top_k, "seq_len": seq_len, "hidden": hidden,
            "bytes_per_token": meta["bytes_per_token"], "bytes": meta["bytes_per_token"] * n_windows * seq_len,
            "seconds": seconds, "is_main": procs.is_main}


def bytes_per_token(meta: dict[str, Any]) -> int:
    k = meta["top_k"]
    per = k * np.dtype(meta["ids_dtype"]).itemsize + k * np.dtype(meta["logprob_dtype"]).itemsize + 4
    return per + (2 * meta["hidden_size"] if meta["hidden"] else 0)


def start_folder(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    """Resume a cache of the same settings in `out`, or start one (replacing another only with overwrite)."""
    if out.exists() and not out.is_dir():
        raise DistilleryError(f"--out {out} is a file; pass a folder for the cache.")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        old = _json_or_none(out / META_NAME)
        if old is not None and old.get("format") != FORMAT:
            raise DistilleryError(f"--out {out} holds something other than a teacher cache ({META_NAME} of another "
                                  "kind); pass a folder of its own.")
        if old is None and not any(name.startswith("shard-") for name in entries):
            raise DistilleryError(f"--out {out} is not empty and holds no teacher cache; pass a new or empty folder.")
        same = old is not None and all(old.get(k) == meta[k] for k in IDENTITY)
        if not same and not overwrite:
            differs = "its meta.json is missing" if old is None else \
                f"{next(k for k in IDENTITY if old.get(k) != meta[k])} differs"
            raise DistilleryError(f"--out {out} holds a teacher cache made with other settings ({differs}); rerun "
                                  "with its settings to resume it, pass --overwrite to replace it, or choose another "
                                  "--out.")
        if not same:
            for name in entries:
                if name.startswith(("shard-", ".shard-")) or name == META_NAME:
                    (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # left by a process killed mid-write
        stale.unlink()
    from distillery.models.checkpoint import write_json

    write_json(out / META_NAME, {**meta, "complete": False})


def _json_or_none(file: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else {}


def _shard_range(meta: dict[str, Any], shard: int) -> tuple[int, int]:
    first = shard * meta["shard_windows"]
    return first, min(first + meta["shard_windows"], meta["windows"])


@torch.inference_mode()
def teacher_outputs(model, inputs: torch.Tensor, top_k: int, hidden: bool):
    """(ids, logprobs, tail, hidden or None) of a (B, T) batch: the top-k of log_softmax(logits) in fp32,
    and the log of the mass outside them as a logsumexp of the rest (-inf when k = V)."""
    out = model(inputs, output_hidden_states=hidden)
    log_p = torch.log_softmax(out.logits.float(), dim=-1)
    values, ids = log_p.topk(top_k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1)
    return ids, values, tail, out.hidden_states[-1] if hidden else None


def write_shard(model, tokens: np.ndarray, out: Path, shard: int, meta: dict[str, Any], batch_size: int,
                device: torch.device, bar) -> None:
    """Compute one shard into temporary .npy files (memory-mapped), then rename each into place."""
    first, end = _shard_range(meta, shard)
    n, L, k = end - first, meta["seq_len"], meta["top_k"]
    shapes = {"ids": ((n, L, k), meta["ids_dtype"]), "logprobs": ((n, L, k), meta["logprob_dtype"]),
              "tail": ((n, L), "float32"), "hidden": ((n, L, meta["hidden_size"] or 0), "float16")}
    parts = shard_parts(meta["hidden"])
    tmp = {p: out / f".{shard_file(out, shard, p).name}.{os.getpid()}.tmp" for p in parts}
    arrays = {p: np.lib.format.open_memmap(tmp[p], mode="w+", dtype=shapes[p][1], shape=shapes[p][0]) for p in parts}
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        block = np.asarray(tokens[(first + lo) * L:(first + hi) * L + 1], dtype=np.int64)
        inputs = torch.from_numpy(np.stack([block[i * L:(i + 1) * L] for i in range(hi - lo)])).to(device)
        results = dict(zip(("ids", "logprobs", "tail", "hidden"), teacher_outputs(model, inputs, k, meta["hidden"])))
        for p in parts:
            arrays[p][lo:hi] = results[p].cpu().numpy().astype(shapes[p][1])
        bar.update(hi - lo)
    for p in parts:
        arrays[p].flush()
        del arrays[p]
        os.replace(tmp[p], shard_file(out, shard, p))


def _barrier(procs) -> None:
    if procs.world_size > 1:
        torch.distributed.barrier()


