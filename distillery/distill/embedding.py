"""Embedding distillation: a small sentence encoder learns to place sentences where its teacher does.

    distillery distill --objective embedding --teacher TEACHER --student STUDENT --data SENTENCES --out RUN

The teacher and student are sentence encoders (sentence-transformers folders, or plain encoders
with mean pooling); the data is a folder written by `distillery prepare CORPUS --sentences`. Each
step embeds a batch of sentences with the frozen teacher and the student and minimises

    loss = alpha_emb * mean_{sentences, dims} (e_s - e_t)^2          (sentence-transformers' MSE)
         + alpha_cos * mean_{tokens} (1 - cos(h_s, h_t))              (last hidden states, optional)
         + alpha_attn * MiniLM's self-attention relations of the last layer (optional)

with e the pooled (and, when the teacher normalises, normalised) embeddings. The loop shares the
LM trainer's pieces (optimizer, schedule, atomic checkpoints, exact resume, metrics, energy) and
differs only in what a batch is: sentences in an order fixed by the seed and the epoch, so a
resumed run continues with the very next sentence.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillery.distill import losses
from distillery.distill.run_config import RunConfig
from distillery.models.common import DistilleryError


def load_encoders(config: RunConfig):
    """(teacher, student) sentence encoders, checked to fit each other."""
    from distillery.models.checkpoint import read_config, resolve_model_dir
    from distillery.models.sentence_encoder import load_sentence_encoder

    for role, name in (("teacher", config.teacher), ("student", config.student)):
        if not name:
            raise DistilleryError("Embedding distillation needs both --teacher and --student (sentence-transformers "
                                  "or encoder folders).")
        model_type = read_config(resolve_model_dir(name)).get("model_type")
        if model_type == "gpt2":
            raise DistilleryError(f"The {role} {name} is a causal LM; the embedding objective distils sentence "
                                  "encoders (BERT, DistilBERT, RoBERTa, sentence-transformers folders).")
    teacher, student = load_sentence_encoder(config.teacher), load_sentence_encoder(config.student)
    if teacher.dimension != student.dimension:
        raise DistilleryError(f"The teacher's embeddings have {teacher.dimension} dimensions and the student's "
                              f"{student.dimension}; make the student with `distillery student` from this teacher.")
    if teacher.tokenizer.fingerprint() != student.tokenizer.fingerprint():
        raise DistilleryError("The teacher and the student use different tokenizers; make the student with "
                              "`distillery student` from this teacher.")
    if student.model.config.num_layers > teacher.model.config.num_layers:
        raise DistilleryError(f"The student has {student.model.config.num_layers} layers and the teacher "
                              f"{teacher.model.config.num_layers}; a student should be smaller than its teacher.")
    return teacher, student


def embedding_terms(student_out, teacher_out, attention_mask: torch.Tensor, config: RunConfig,
                    student_qkv=None, teacher_qkv=None) -> dict[str, torch.Tensor]:
    """Each loss term's mean over this batch."""
    terms = {"emb": F.mse_loss(student_out.embeddings.float(), teacher_out.embeddings.float())}
    mask = attention_mask.bool()
    if config.alpha_cos > 0:
        terms["cos"] = losses.hidden_cosine_loss(student_out.token_embeddings, teacher_out.token_embeddings, mask)
    if config.alpha_attn > 0:
        terms["attn"] = sum(attention_relation_loss(s, t, config.relation_heads, mask)
                            for s, t in zip(student_qkv, teacher_qkv, strict=True)) / 3
    return terms


def attention_relation_loss(student: torch.Tensor, teacher: torch.Tensor, heads: int,
                            mask: torch.Tensor) -> torch.Tensor:
    """MiniLM-v2's self-attention relation loss for one of queries, keys or values, (B, T, C) each:

        R = softmax(A_h A_h^T / sqrt(d_r)) per relation head h (A split into `heads` parts of d_r),
        loss = mean_{heads, real query positions} KL(R_teacher || R_student)

    Pad keys are masked out of both softmaxes. Teacher and student may differ in width: only the
    (T x T) relations are compared.
    """
    def relations(states: torch.Tensor) -> torch.Tensor:
        B, T, C = states.shape
        if C % heads:
            raise DistilleryError(f"relation_heads ({heads}) must divide the hidden size ({C}); change it.")
        parts = states.float().view(B, T, heads, C // heads).transpose(1, 2)  # (B, h, T, d_r)
        scores = parts @ parts.transpose(-1, -2) / math.sqrt(C // heads)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return torch.log_softmax(scores, dim=-1)

    log_t, log_s = relations(teacher), relations(student)
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~mask[:, None, None, :], 0.0).sum(-1)  # (B, h, T)
    rows = mask[:, None, :].expand_as(kl)
    return kl[rows].mean()


class LastLayerQKV:
    """Captures the last layer's queries, keys and values (each (B, T, C)) on every forward."""

    def __init__(self, encoder: nn.Module) -> None:
        layer = encoder.model.layers[-1]
        linear = _qkv_module(layer)
        self.parts: tuple[torch.Tensor, ...] = ()
        self.handle = linear.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.parts = tuple(output.chunk(3, dim=-1))

    def remove(self) -> None:
        self.handle.remove()


def _qkv_module(layer: nn.Module) -> nn.Module:
    for name, module in layer.named_modules():
        if name.endswith("qkv") and isinstance(module, nn.Linear):
            return module
    raise DistilleryError("alpha_attn needs an encoder whose attention has one fused qkv projection "
                          f"({type(layer).__name__} has none); set --alpha-attn 0.")


POOL_BATCHES = 32  # batches whose sentences are sorted by length together


@functools.lru_cache(maxsize=2)
def epoch_batches(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int) -> tuple[tuple[int, ...], ...]:
    """The batches of sentence indices of one epoch, fixed by seed and epoch.

    Sentences are shuffled, cut into pools of POOL_BATCHES batches, sorted by length within each
    pool (so a batch pads little: books mix three-word and eighty-word sentences) and cut into
    batches, whose order is then shuffled again. The last partial batch of an epoch is dropped.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    pool = batch_size * POOL_BATCHES
    for start in range(0, len(order) - batch_size + 1, pool):
        members = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches.extend(tuple(members[j:j + batch_size]) for j in range(0, len(members) - batch_size + 1, batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return tuple(batches[i] for i in shuffled)


def draw(sentences: list[str], lengths: tuple[int, ...], cursor: tuple[int, int], batch_size: int,
         seed: int) -> tuple[list[str], tuple[int, int]]:
    """The batch at (epoch, batch number), and the cursor after it."""
    epoch, index = cursor
    batches = epoch_batches(lengths, batch_size, seed, epoch)
    batch = [sentences[i] for i in batches[index]]
    index += 1
    return batch, ((epoch + 1, 0) if index >= len(batches) else (epoch, index))


@torch.no_grad()
def validation_mse(teacher, student, sentences: list[str], batch_size: int) -> float:
    """The embedding MSE over the validation sentences (the objective's main term)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    for start in range(0, len(sentences), batch_size):
        batch = teacher.tokenize(sentences[start:start + batch_size])
        e_t = teacher(batch["input_ids"], batch["attention_mask"]).embeddings
        e_s = student(batch["input_ids"], batch["attention_mask"]).embeddings
        total += float(F.mse_loss(e_s.float(), e_t.float(), reduction="sum"))
        count += e_t.numel()
    student.train(was_training)
    return total / max(count, 1)


def run_embedding(config: RunConfig, procs, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    """The embedding-distillation loop (one process; the LM trainer's `run` wraps it for energy)."""
    from distillery.distill.sentences import read_sentences
    from distillery.distill.trainer import (
        CHECKPOINT_NAME,
        CONFIG_NAME,
        FINAL_MODEL_DIR,
        METRICS_NAME,
        PLOT_NAME,
        MetricsLog,
        _progress_bar,
        broken_weights,
        check_resumable,
        check_same_layout,
        diverged,
        host_to_device,
        load_checkpoint,
        lr_factor,
        make_optimizer,
        save_checkpoint,
    )
    from distillery.models.common import weights_finite

    if procs.world_size > 1:
        raise DistilleryError("The embedding objective runs in one process; launch it without torchrun.")
    # Everything that can fail is checked before the first step.
    train, val = read_sentences(config.data, "train"), read_sentences(config.data, "val")
    if len(train) < config.batch_size:
        raise DistilleryError(f"{config.data} holds {len(train)} training sentences, fewer than one batch of "
                              f"{config.batch_size}; add text or lower --batch-size.")
    if not val:
        raise DistilleryError(f"{config.data} holds no validation sentences; prepare it again with --val-sentences.")
    sts_pairs = None
    if config.eval_sts:
        from distillery.evaluate.sts import read_sts

        sts_pairs = read_sts(config.eval_sts)
    lengths = tuple(len(t) for t in train)  # characters: the order only needs to group similar lengths
    teacher, student = load_encoders(config)
    # --seq-len cuts the training sentences; the saved student keeps its own max_seq_length.
    student_max_seq_length = student.max_seq_length
    for encoder in (teacher, student):
        encoder.max_seq_length = min(encoder.max_seq_length, config.seq_len)
    device = procs.device
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    val = val[:config.eval_batches * config.batch_size]
    student_qkv = LastLayerQKV(student) if config.alpha_attn > 0 else None
    teacher_qkv = LastLayerQKV(teacher) if config.alpha_attn > 0 else None

    optimizer = make_optimizer(student.model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    checkpoint_path = out / CHECKPOINT_NAME
    fingerprint = teacher.tokenizer.fingerprint()
    step, sentences_seen, cursor = 0, 0, (0, 0)
    if resume:
        checkpoint = load_checkpoint(checkpoint_path)
        check_resumable(checkpoint, config, fingerprint, checkpoint_path)
        check_same_layout(checkpoint["model"], student.model, checkpoint_path)
        student.model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        step, sentences_seen, cursor = checkpoint["step"], checkpoint["sentences"], tuple(checkpoint["cursor"])
    elif checkpoint_path.exists():
        raise DistilleryError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    else:
        torch.manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    config.save_yaml(out / CONFIG_NAME)
    log = MetricsLog(out / METRICS_NAME, step if resume else None)
    config_plot = config.plot and importlib.util.find_spec("matplotlib") is not None
    if config.plot and not config_plot:
        print("matplotlib is not installed, so no loss.png is drawn (pip install matplotlib to get it).",
              file=sys.stderr)

    weights = {"emb": config.alpha_emb, "cos": config.alpha_cos, "attn": config.alpha_attn}
    def evaluate(at_step: int) -> dict[str, Any]:
        """The student's validation MSE now, and its STS-B Spearman with --eval-sts."""
        record: dict[str, Any] = {"step": at_step, "val_loss": validation_mse(teacher, student, val, config.batch_size)}
        if sts_pairs is not None and math.isfinite(record["val_loss"]):
            from distillery.evaluate.sts import evaluate_sts

            record["val_sts_spearman"] = evaluate_sts(student, sts_pairs, batch_size=64)["spearman"]
            student.train()
        return record

    bar = _progress_bar(config.max_steps, step, progress)
    running: dict[str, float] = {}
    train_seconds, started_step, last_eval = 0.0, step, None
    started = time.perf_counter()
    while step < config.max_steps:
        step_started = time.perf_counter()
        texts, cursor = draw(train, lengths, cursor, config.batch_size, config.seed)
        batch = teacher.tokenize(texts)
        ids, mask = host_to_device(batch["input_ids"], device), host_to_device(batch["attention_mask"], device)
        with torch.inference_mode():
            t_out = teacher(ids, mask)
            t_parts = teacher_qkv.parts if teacher_qkv else None
        t_out = type(t_out)(t_out.embeddings.clone(), t_out.token_embeddings.clone())
        t_parts = tuple(p.clone() for p in t_parts) if t_parts else None
        s_out = student(ids, mask)
        terms = embedding_terms(s_out, t_out, mask, config, student_qkv.parts if student_qkv else None, t_parts)
        loss = sum(weights[name] * value for name, value in terms.items())
        if not torch.isfinite(loss):
            raise DistilleryError(f"The loss became {float(loss)} at step {step + 1}; the last checkpoint in {out} is "
                                  "kept. Lower --lr (or raise --warmup-steps) and --resume, or start again.")
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(student.model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        sentences_seen += len(texts)
        for name, value in {**terms, "loss": loss}.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        train_seconds += time.perf_counter() - step_started
        per_s = (step - started_step) * config.batch_size / max(train_seconds, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3g}", sent_s=f"{per_s:,.0f}",
                        sts="-" if last_eval is None else f"{last_eval:.2f}")
        if step % config.log_every == 0 or step == config.max_steps:
            n = config.log_every if step % config.log_every == 0 else step % config.log_every
            log.write({"step": step, **{k: v / n for k, v in running.items()}, "lr": scheduler.get_last_lr()[0],
                       "sentences": sentences_seen, "sentences_per_s": per_s,
                       "elapsed_s": time.perf_counter() - started})
            running = {}
        # Evaluated before its checkpoint, so that a NaN stops the run first; the last step after
        # its checkpoint and the final model, so that an error there loses nothing.
        if step % config.eval_every == 0 and step != config.max_steps:
            record = evaluate(step)
            if not math.isfinite(record["val_loss"]):  # before a checkpoint or model of these weights
                bar.close()
                raise diverged("validation", record["val_loss"], step, checkpoint_path, config)
            last_eval = record.get("val_sts_spearman")
            log.write(record)
        if step % config.save_every == 0 or step == config.max_steps:
            if not weights_finite(student.model):  # the last update broke them: keep the checkpoint before it
                bar.close()
                raise broken_weights(step, checkpoint_path, config)
            save_checkpoint(checkpoint_path, {
                "step": step, "sentences": sentences_seen, "cursor": list(cursor), "config": config.identity(),
                "tokenizer": fingerprint, "model": student.model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()})
            if config_plot:
                log.plot(out / PLOT_NAME)
    bar.close()
    for hook in (student_qkv, teacher_qkv):
        if hook is not None:
            hook.remove()

    final = out / FINAL_MODEL_DIR
    student.eval()
    student.max_seq_length = student_max_seq_length
    student.save_pretrained(final)
    named = Path(config.out)  # where the run ends up (`out` may be a folder beside it)
    if not any(r["step"] == step and "val_loss" in r for r in log.records):  # not a finished run resumed
        record = evaluate(step)
        if not math.isfinite(record["val_loss"]):
            raise diverged("validation", record["val_loss"], step, checkpoint_path, config,
                           kept=f"the weights of that step, all finite, are in {final}")
        log.write(record)
    summary: dict[str, Any] = {"run": str(named), "kind": config.kind, "objective": "embedding", "steps": step,
                               "sentences": sentences_seen, "parameters": student.model.num_parameters(),
                               "model": str(named / FINAL_MODEL_DIR), "metrics": str(named / METRICS_NAME),
                               "checkpoint": str(named / CHECKPOINT_NAME)}
    train_records = [r for r in log.records if "loss" in r]
    if train_records:
        summary["train_loss"] = train_records[-1]["loss"]
    last = [r for r in log.records if "val_loss" in r][-1]  # this step's, made above or by the finished run
    summary["val_loss"] = last["val_loss"]
    if "val_sts_spearman" in last:
        summary["val_sts_spearman"] = last["val_sts_spearman"]
    summary["val_ppl"] = None
    return summary
