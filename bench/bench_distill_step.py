"""Tokens/s of one distillation step: distillery's trainer against plain transformers, same weights.

One step = teacher forward (frozen) + student forward + losses (soft-target KL at T, hard LM
loss, cosine of the last hidden states, with DistilBERT's weights 5 / 2 / 1) + backward + AdamW
step. The reference implements the same losses in a few lines on transformers' GPT2LMHeadModel,
loaded from the very files distillery loads. The two alternate, step by step, in one process;
the first step's losses are printed side by side to show they compute the same thing.

    python bench/bench_distill_step.py                      # GPT-2 small teacher (12 layers), 6-layer student
    python bench/bench_distill_step.py --n-layer 4 --n-embd 256 --batch-size 4 --seq-len 128 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from distillery.distill.run_config import RunConfig
from distillery.distill.student import make_student
from distillery.distill.trainer import Batch, loss_terms, make_optimizer, term_weights
from distillery.models import load_model


def reference_step(teacher, student, optimizer, ids, config: RunConfig, amp) -> float:
    """The same losses as distillery's trainer, written directly on transformers' models."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    T = config.temperature
    with amp:
        with torch.no_grad():
            t = teacher(inputs, output_hidden_states=True)
        s = student(inputs, output_hidden_states=True)
        s_logits, t_logits = s.logits.float().flatten(0, 1), t.logits.float().flatten(0, 1)
        kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="batchmean") * T**2
        lm = F.cross_entropy(s_logits, targets.flatten())
        cos = (1 - F.cosine_similarity(s.hidden_states[-1].float(), t.hidden_states[-1].float(), dim=-1)).mean()
        loss = config.alpha_ce * kd + config.alpha_lm * lm + config.alpha_cos * cos
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def distillery_step(teacher, student, optimizer, ids, config: RunConfig, amp) -> float:
    """One step of distillery's trainer (its loss_terms and weights; one micro-batch, one process)."""
    weights = term_weights(config)
    with amp:
        terms = loss_terms(student, teacher, Batch(ids[:, :-1], ids[:, 1:], None), True, config, None)
        loss = sum(weights[name] * value for name, value in terms.items())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=12, help="teacher layers (the student has half)")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    # No dropout, so the two implementations see identical numbers and their losses can be compared.
    hf_config = transformers.GPT2Config(vocab_size=args.vocab_size, n_positions=max(1024, args.seq_len + 1),
                                        n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=args.vocab_size - 1, eos_token_id=args.vocab_size - 1)
    config = RunConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(hf_config).save_pretrained(Path(tmp) / "teacher")
        ours_teacher = load_model(Path(tmp) / "teacher")
        ours_student = make_student(ours_teacher)
        ours_student.save_pretrained(Path(tmp) / "student")
        theirs_teacher = transformers.GPT2LMHeadModel.from_pretrained(Path(tmp) / "teacher")
        theirs_student = transformers.GPT2LMHeadModel.from_pretrained(Path(tmp) / "student")

    runs = {}
    for name, teacher, student, step in (
        ("distillery", ours_teacher, ours_student, distillery_step),
        ("transformers", theirs_teacher, theirs_student, reference_step),
    ):
        teacher.to(device).eval().requires_grad_(False)
        student.to(device).train()
        runs[name] = dict(teacher=teacher, student=student, step=step, opt=make_optimizer(student, config),
                          times=[], first_loss=None)

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
               for _ in range(args.warmup + args.steps)]
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        for r in runs.values():  # alternate, so both see the same machine load
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = r["step"](r["teacher"], r["student"], r["opt"], ids, config, amp())
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i == 0:
                r["first_loss"] = loss
            if i >= args.warmup:
                r["times"].append(time.perf_counter() - t0)

    tokens = args.batch_size * args.seq_len
    print(f"teacher {args.n_layer} layers x {args.n_embd}, student {ours_student.config.n_layer} layers; "
          f"batch {args.batch_size} x {args.seq_len} tokens on {device} ({'bf16 autocast' if amp_dtype else 'fp32'})")
    speeds = {}
    for name, r in runs.items():
        median = statistics.median(r["times"])
        speeds[name] = tokens / median
        print(f"  {name:13} {speeds[name]:>10,.0f} tokens/s  (median step {median * 1000:.1f} ms; "
              f"first loss {r['first_loss']:.6f})")
    print(f"  ratio distillery / transformers: {speeds['distillery'] / speeds['transformers']:.2f}x")


if __name__ == "__main__":
    main()
