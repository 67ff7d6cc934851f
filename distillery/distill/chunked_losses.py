"""Vocabulary losses computed chunk by chunk, fused with the LM head.

Over GPT-2's vocabulary the logits of a batch of 8 x 256 positions are 412 MB, and the teacher's
logits, both softmaxes and the gradient are as big again; on a CPU, making and reading those
tensors is most of a distillation step. Here the student's head, the teacher's head and every
vocabulary loss run over `chunk_size` positions at a time, so the full (positions x vocabulary)
logits never exist. Each chunk's gradient with respect to its logits is written down in closed
form (below) and pushed through the head at once: dL/dh and dL/dW are accumulated in the forward
pass and handed out, scaled, in the backward (the Liger-Kernel / torchtune approach). The
losses are those of `losses.py`, which stays the reference the tests compare against.

For one position with student logits s, teacher logits t, temperature T, z = s / T,
p_s = softmax(s / T), p_t = softmax(t / T), m = beta p_t + (1 - beta) p_s:

    term                              value                        d value / d s
    hard LM (target y, T = 1)         -log softmax(s)[y]           softmax(s) - onehot(y)
    forward KL (`soft_target_kl`)     T^2 KL(p_t || p_s)           T (p_s - p_t)
    reverse KL (`reverse_kl`)         T^2 KL(p_s || p_t)           T p_s * (log p_s - log p_t - KL(p_s || p_t))
    gJSD (`generalized_jsd`)          T^2 JSD_beta(p_t, p_s)       T (1 - beta) p_s * (log p_s - log m - KL(p_s || m))
    logits MSE (`logits_mse`)         mean_v (s_v - t_v)^2         2 (s - t) / V
    sparse KD (`sparse_kd_loss`)      T^2 KL(q_t || q_s)           g_b(v) p_v / P_b(v)

The sparse KD is against a teacher cache's top k: q = softmax(log P / T) over k + 1 buckets (the
k stored ids, then every other token), P_j the bucket's probability at T = 1 (teacher: stored;
student: p = softmax(s)), b(v) the bucket of token v and g = T (q_s - q_t). Because sum_j g_j = 0,
the -p_v part of d log P_j / d s_v cancels: an id's gradient is its g_j, the rest share g_tail in
proportion to p_v.

Each term is the mean over its positions (targets != -100 for the LM loss, `kd_rows` for the soft
targets and the MSE), 0 where none count; the gradient is that of sum_k weight_k * term_k, with
the weights given up front (they are the trainer's loss weights times each term's share of the
batch), which is what lets the gradient be taken inside the chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distillery.distill.losses import IGNORE_INDEX
from distillery.distill.teacher_cache import EMPTY_TAIL_LOG, bucket_kl

TERMS = ("lm", "kd", "mse")
KD_LOSSES = ("forward_kl", "reverse_kl", "gjsd", "sparse")  # sparse: against a teacher cache's top k
# Positions per chunk. Measured on the 2-core CPU (shared, so noisy), the chunked head and losses
# (forward KL + LM) of 1024 positions 256 wide over GPT-2's vocabulary, forward and backward: full
# logits 8.0 s, chunks of 64 / 128 / 256 / 512 / 1024 positions 3.7 / 3.6 / 4.0 / 4.4 / 4.5 s (one
# thread); a whole distillation step (4 x 256 teacher, 2-layer student, 8 x 128) with chunks of
# 128 / 256 / 512: 2.9 / 3.3 / 3.6 s at two threads, peak RSS 0.87 / 0.93 / 1.17 GB. The products
# run as fast at 128 rows as at 512 on one thread (80-100 GFLOPS); a chunk's four (128 x V) float32
# buffers are 26 MB each for GPT-2's vocabulary.
DEFAULT_CHUNK_SIZE = 128


@dataclass(frozen=True)
class VocabLosses:
    """Which vocabulary losses to compute, and their weights in the returned total.

    `weights` maps a term of TERMS to its weight; a term not named is not computed. A term with
    weight 0 is computed (for the log) but adds nothing to the gradient.
    """

    weights: dict[str, float]
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        assert set(self.weights) <= set(TERMS), f"unknown terms {set(self.weights) - set(TERMS)}"
        assert self.kd_loss in KD_LOSSES, self.kd_loss
        assert self.temperature > 0 and 0.0 <= self.beta <= 1.0 and self.chunk_size > 0
        # The sparse KD computes in the teacher logits' buffer, which the MSE would read.
        assert not (self.kd_loss == "sparse" and "mse" in self.weights), "the sparse KD has no logits MSE"

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher's logits are needed (the sparse KD reads stored targets instead)."""
        return ("kd" in self.weights and self.kd_loss != "sparse") or "mse" in self.weights

    @property
    def needs_sparse_targets(self) -> bool:
        return "kd" in self.weights and self.kd_loss == "sparse"


def fused_vocab_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    spec: VocabLosses,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kd_rows: torch.Tensor | None = None,
    sparse_targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's head and the vocabulary losses over chunks of positions.

    hidden (N, C): what the student's vocabulary head multiplies; weight (V, C) and bias (V,) that
    head's. targets (N,): the LM targets, -100 where none. teacher_hidden (N, C_t) and
    teacher_head (a module or function of a (n, C_t) chunk -> (n, V) logits) when `spec` has a
    soft-target term; the teacher's logits are made per chunk, without gradient. kd_rows (N,)
    bool: the positions the soft targets cover (None: all). sparse_targets, for kd_loss "sparse": a
    teacher cache's (ids (N, k), log-probs (N, k), tail (N,)), as `teacher_cache.sparse_kd_loss` takes.

    Returns (total, terms): total = sum_k spec.weights[k] * terms[k], differentiable with respect
    to hidden, weight and bias; terms, each the mean over its positions, detached.
    """
    assert spec.weights, "no loss term asked for"
    assert hidden.dim() == 2 and targets.shape == hidden.shape[:1], (hidden.shape, targets.shape)
    assert kd_rows is None or kd_rows.shape == targets.shape
    if spec.needs_teacher:
        assert teacher_hidden is not None and teacher_head is not None
        assert teacher_hidden.shape[0] == hidden.shape[0], (teacher_hidden.shape, hidden.shape)
    if spec.needs_sparse_targets:
        assert sparse_targets is not None and sparse_targets[0].shape[0] == hidden.shape[0]
    inputs = (hidden, weight) + ((bias,) if bias is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        total, values = _FusedVocabLosses.apply(hidden, weight, bias, targets, teacher_hidden, teacher_head,
                                                kd_rows, sparse_targets, spec)
    else:  # evaluation: the values alone, no gradient work
        with torch.no_grad():
            values, _ = _chunked(hidden, weight, bias, targets, teacher_hidden, teacher_head, kd_rows,
                                 sparse_targets, spec, want_grads=False)
        total = sum(spec.weights[k] * values[i] for i, k in enumerate(_wanted(spec)))
    return total, {k: values[i].detach() for i, k in enumerate(_wanted(spec))}


class _FusedVocabLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_hidden, teacher_head, kd_rows, sparse_targets, spec):
        values, grads = _chunked(hidden, weight, bias, targets, teacher_hidden, teacher_head, kd_rows,
                                 sparse_targets, spec, want_grads=True)
        ctx.save_for_backward(*grads)
        ctx.has_bias = bias is not None
        total = sum(spec.weights[k] * values[i] for i, k in enumerate(_wanted(spec)))
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, _grad_values):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if not ctx.has_bias:
            grad_bias = None
        # The gradients were taken for a total of 1; scale them by what reaches the total (1 unless
        # a loss scaler or an outer weight multiplies it).
        if grad_total.item() != 1.0:
            grad_hidden, grad_weight = grad_hidden * grad_total, grad_weight * grad_total
            grad_bias = grad_bias * grad_total if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _wanted(spec: VocabLosses) -> list[str]:
    return [k for k in TERMS if k in spec.weights]


def _chunked(hidden, weight, bias, targets, teacher_hidden, teacher_head, kd_rows, sparse_targets,
             spec: VocabLosses, want_grads: bool):
    """(values (K,), (dL/dhidden, dL/dweight, dL/dbias) or ()) over chunks of rows."""
    N, V = hidden.size(0), weight.size(0)
    wanted = _wanted(spec)
    lm_rows = targets != IGNORE_INDEX
    counts = {"lm": int(lm_rows.sum()), "kd": N if kd_rows is None else int(kd_rows.sum())}
    counts["mse"] = counts["kd"]
    # Each row's gradient is weight_k / (positions of term k): the gradient of the weighted means.
    scales = {k: spec.weights[k] / max(counts[k], 1) for k in wanted}
    # The dtype the head multiplies in: autocast's when it is on (bf16 on a GPU), else the weight's.
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    W = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    # The gradient's products too, except in fp16, whose range would lose the small gradients of an
    # unscaled loss (the loss scaler only multiplies them in the backward).
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    W_grad = weight.to(grad_dtype)
    # A float teacher head is multiplied straight into a buffer, in the same dtype; any other
    # (int8, bf16 weights) is called.
    t_linear = isinstance(teacher_head, nn.Linear) and teacher_head.weight.dtype == torch.float32
    if t_linear:
        t_weight = teacher_head.weight.to(dtype)
        t_bias = teacher_head.bias.to(dtype) if teacher_head.bias is not None else None
    sums = torch.zeros(len(wanted), dtype=torch.float32, device=hidden.device)
    # The (chunk, V) float32 buffers every chunk reuses: on a CPU, a fresh tensor over 32 MB is
    # mapped anew and costs about as much to touch the first time (page faults) as a softmax over it.
    rows_max = min(spec.chunk_size, N)
    buffers = [torch.empty(rows_max, V, dtype=torch.float32, device=hidden.device)
               for _ in range(5 if spec.kd_loss == "gjsd" else 4)]
    grads = ()
    if want_grads:
        grad_hidden = torch.empty(N, hidden.size(1), dtype=grad_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(V, dtype=torch.float32, device=weight.device) if bias is not None else None
        low_grad_weight = None
    with torch.autocast(device_type, enabled=False):
        for start in range(0, N, spec.chunk_size):
            rows = slice(start, min(start + spec.chunk_size, N))
            n = rows.stop - rows.start
            work = [buffer[:n] for buffer in buffers]
            h = hidden[rows].to(dtype)
            s = _linear_into(work[0], h, W, b)
            t = None
            if spec.needs_teacher:
                t_in = teacher_hidden[rows]
                t = _linear_into(work[1], t_in.to(dtype), t_weight, t_bias) if t_linear \
                    else work[1].copy_(teacher_head(t_in))
            kd = kd_rows[rows] if kd_rows is not None else None
            sparse = tuple(x[rows] for x in sparse_targets) if sparse_targets is not None else None
            chunk_sums, grad = chunk_losses(s, t, targets[rows], kd, spec, scales, want_grads, work, sparse)
            sums += torch.stack([chunk_sums[k] for k in wanted])
            if want_grads:
                grad, h = grad.to(grad_dtype), h.to(grad_dtype)
                torch.mm(grad, W_grad, out=grad_hidden[rows])
                if grad_dtype == torch.float32:
                    grad_weight.addmm_(grad.t(), h)
                else:  # a low-precision product into its own buffer, summed in float32
                    if low_grad_weight is None:
                        low_grad_weight = torch.empty(weight.shape, dtype=grad_dtype, device=weight.device)
                    _add_in_float32(grad_weight, torch.mm(grad.t(), h, out=low_grad_weight))
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
    values = torch.stack([sums[i] / max(counts[k], 1) for i, k in enumerate(wanted)])
    if want_grads:
        grads = (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                 grad_bias.to(bias.dtype) if grad_bias is not None else torch.zeros(0))
    return values, grads


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_v x[i, v] y[i, v] per row, as a batch of (1 x V) @ (V x 1) products: no (n, V) temporary
    (torch.linalg.vecdot made one, 6.6 against 2.8 ms for 128 x 50,257 on the 2-core CPU)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _add_in_float32(total: torch.Tensor, low: torch.Tensor, block_elements: int = 2**19) -> None:
    """total (float32) += low (bf16 or fp16), a block of rows at a time: a mixed-dtype add_ on a CPU
    runs about 5x slower than converting a block and adding float32 to float32 (measured: 21 vs
    4.5 ms for GPT-2's 50,257 x 256), and the blocks keep the float32 copy small."""
    rows = max(1, block_elements // max(1, total.size(1)))
    for start in range(0, total.size(0), rows):
        total[start:start + rows].add_(low[start:start + rows].float())


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b, written into the float32 buffer `out`."""
    if x.dtype == out.dtype:
        return torch.addmm(bias, x, weight.t(), out=out) if bias is not None else torch.mm(x, weight.t(), out=out)
    return out.copy_(torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t())


def chunk_losses(
    s: torch.Tensor,
    t: torch.Tensor | None,
    targets: torch.Tensor,
    kd_rows: torch.Tensor | None,
    spec: VocabLosses,
    scales: dict[str, float],
    want_grad: bool = True,
    work: list[torch.Tensor] | None = None,
    sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One chunk: each term's sum over its rows, and d(sum_k scales[k] * sum_k)/ds (module docstring).

    s, t: (n, V) float32 student and teacher logits, overwritten (t None and its buffer free for a
    sparse KD); targets (n,); kd_rows (n,) bool or None; sparse: the chunk's stored top-k targets
    (ids, log-probs, tail). `work`: (n, V) float32 buffers to compute in, s and t first (fresh ones
    if None).
    Returns the sums and the gradient (None without `want_grad`), which lives in one of the buffers.
    """
    n, V = s.shape
    T = spec.temperature
    if work is None:
        work = [s, t if t is not None else torch.empty_like(s)] + [torch.empty_like(s) for _ in range(3)]
    a, b, grad = work[2], work[4] if len(work) > 4 else None, work[3]
    sums: dict[str, torch.Tensor] = {}
    started = False  # whether `grad` holds something yet
    kd_weight = kd_rows.float() if kd_rows is not None else None

    def accumulate(term: torch.Tensor, row_scale: torch.Tensor) -> None:
        """grad += row_scale[:, None] * term."""
        nonlocal started
        if started:
            grad.addcmul_(term, row_scale.unsqueeze(1))
        else:
            torch.mul(term, row_scale.unsqueeze(1), out=grad)
            started = True

    def kd_sum(per_row: torch.Tensor) -> torch.Tensor:
        return (per_row * kd_weight).sum() if kd_weight is not None else per_row.sum()

    def kd_scale(scale: float) -> torch.Tensor:
        return kd_weight * scale if kd_weight is not None else torch.full((n,), scale, device=s.device)

    sparse_kd = "kd" in scales and spec.kd_loss == "sparse"
    if "lm" in scales or sparse_kd:
        log_p = torch.log_softmax(s, dim=-1, out=a)  # at T = 1, for both
    if "lm" in scales:
        keep = targets != IGNORE_INDEX
        y = targets.clamp(min=0).unsqueeze(1)
        sums["lm"] = -(log_p.gather(1, y).squeeze(1) * keep).sum()
    if sparse_kd:  # before the LM gradient, which overwrites p
        ids, l_t, tail_t = sparse
        ids = ids.long()
        z_ids = log_p.gather(1, ids)
        p = log_p.exp_()
        rest = t if t is not None else work[1]  # the teacher's buffer: no teacher logits here
        rest.copy_(p).scatter_(1, ids, 0.0)
        p_tail = rest.sum(-1)
        log_tail = torch.where(p_tail > 0, p_tail.log(), EMPTY_TAIL_LOG)
        kl, q_s, q_t = bucket_kl(torch.cat([z_ids, log_tail[:, None]], dim=-1), l_t, tail_t, T)
        sums["kd"] = T**2 * kd_sum(kl)
        if want_grad and scales["kd"] != 0:
            g = T * (q_s - q_t)
            # An empty bucket has nothing to share its gradient among (rest is 0 there).
            rest.mul_((g[:, -1] / p_tail.clamp_min(torch.finfo(p_tail.dtype).tiny)).unsqueeze(1))
            rest.scatter_(1, ids, g[:, :-1])
            accumulate(rest, kd_scale(scales["kd"]))
    if "lm" in scales and want_grad and scales["lm"] != 0:
        p = log_p if sparse_kd else log_p.exp_()  # the sparse KD has taken the exp already
        p.scatter_add_(1, y, p.new_full((n, 1), -1.0))  # softmax(s) - onehot(y)
        accumulate(p, keep.float() * scales["lm"])
    if "mse" in scales:
        diff = torch.sub(s, t, out=a)
        sums["mse"] = kd_sum(_row_dot(diff, diff) / V)
        if want_grad and scales["mse"] != 0:
            accumulate(diff, kd_scale(2.0 * scales["mse"] / V))
    if "kd" in scales and not sparse_kd:
        log_p_s = torch.log_softmax(s.div_(T), dim=-1, out=a)
        log_p_t = torch.log_softmax(t.div_(T), dim=-1, out=s)  # s and t are free from here on
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "gjsd": spec.beta}[spec.kd_loss]
        grad_wanted = want_grad and scales["kd"] != 0
        if beta == 0.0:  # forward KL: sum_v p_t (log p_t - log p_s); grad T (p_s - p_t)
            p_t = torch.exp(log_p_t, out=t)
            sums["kd"] = T**2 * kd_sum(_row_dot(p_t, log_p_t.sub_(log_p_s)))
            if grad_wanted:
                accumulate(log_p_s.exp_().sub_(p_t), kd_scale(T * scales["kd"]))
        elif beta == 1.0:  # reverse KL: sum_v p_s (log p_s - log p_t); grad T p_s (log p_s - log p_t - KL)
            p_s = torch.exp(log_p_s, out=t)
            log_ratio = log_p_s.sub_(log_p_t)
            kl = _row_dot(p_s, log_ratio)
            sums["kd"] = T**2 * kd_sum(kl)
            if grad_wanted:
                accumulate(log_ratio.sub_(kl.unsqueeze(1)).mul_(p_s), kd_scale(T * scales["kd"]))
        else:  # gJSD: beta KL(p_t || m) + (1 - beta) KL(p_s || m), log m = logaddexp(log p_t + log beta, ...)
            b = b if b is not None else torch.empty_like(s)
            log_m = torch.logaddexp(torch.add(log_p_t, math.log(beta), out=t),
                                    torch.add(log_p_s, math.log1p(-beta), out=b), out=b)
            p_t = torch.exp(log_p_t, out=t)
            kl_t = _row_dot(p_t, log_p_t.sub_(log_m))
            p_s = torch.exp(log_p_s, out=t)
            log_ratio = log_p_s.sub_(log_m)  # log p_s - log m
            kl_s = _row_dot(p_s, log_ratio)
            sums["kd"] = T**2 * kd_sum(beta * kl_t + (1.0 - beta) * kl_s)
            if grad_wanted:
                accumulate(log_ratio.sub_(kl_s.unsqueeze(1)).mul_(p_s), kd_scale(T * (1.0 - beta) * scales["kd"]))
    if not want_grad:
        return sums, None
    if not started:
        grad.zero_()
    return sums, grad
