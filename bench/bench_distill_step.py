"""Tokens/s and peak memory of distillation as `distillery distill` runs it, against a transformers reference.

Every configuration runs in a process of its own, so that its peak memory is its own:
- transformers (the reference): GPT2LMHeadModel teacher and student, the same losses written in a
  few lines (soft-target KL at T = 2, hard LM loss, last-hidden cosine; weights 5 / 2 / 1), AdamW;
- distillery plain: the trainer's loop (`distillery.distill.trainer.run`, what `distillery distill`
  runs) with the losses on full logits (`--no-chunked-loss`);
- chunked: the vocabulary head and losses chunk by chunk (the default);
- chunked + int8 teacher (`--teacher-dtype int8`, CPU only) and chunked + bf16 teacher;
- chunked + compiled (`--compile`);
- from the teacher cache (`distillery teacher-cache --top-k 64 --hidden`, then `distill --teacher-cache`): the
  teacher runs once, offline, before the timed run (its build time is printed apart);
- bf16: the student under bf16 autocast and a bf16 teacher (`--precision bf16 --teacher-dtype bf16`),
  against the reference under the same autocast ("transformers+bf16"), and from the cache under
  bf16 autocast ("cache+bf16"); every other row is fp32.
Same random weights (dropout 0), same batches (the trainer's data generator over books from
../shared/data, GPT-2's tokenizer), fp32 on a CPU. Tokens/s is the median step after the warm-up
steps (the first step of a compiled run compiles); peak memory is the process's peak RSS (models,
data, optimizer, evaluation and checkpoint included). First-step losses are shown against the
reference's.

Shapes (--shapes): "vocab": a 4 x 256 teacher, 2-layer student, GPT-2 vocabulary, batch 8 x 128,
where the vocabulary is nearly all the work; "gpt2": GPT-2 small (12 x 768) teacher, 6-layer
student, batch 8 x 256; "tiny": a smoke test. --memory-check adds one step at 32 x 1024 on the
gpt2 shape, chunked and plain, each under an address-space limit of 24 GB (less where the machine
has less memory free, so that nothing else is pushed out).

    python bench/bench_distill_step.py                        # both shapes (~25 min on a quiet 2-core CPU)
    python bench/bench_distill_step.py --memory-check         # and the 32 x 1024 batch
    python bench/bench_distill_step.py --shapes tiny --steps 2 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
BOOKS = 4  # books tokenized for the data (any text will do: the weights are random)

SHAPES = {
    "vocab": dict(n_layer=4, n_embd=256, n_head=4, batch_size=8, seq_len=128),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, batch_size=8, seq_len=256),
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, batch_size=2, seq_len=32),
}
CACHE = "<the shape's teacher cache>"  # replaced by the cache's path once it is built
CACHE_TOP_K = 64
# name: trainer settings ({"reference": True}: the transformers loop)
CONFIGS = {
    "transformers": {"reference": True},
    "plain": dict(chunked_loss=False),
    "chunked": dict(chunked_loss=True),
    "chunked+int8": dict(chunked_loss=True, teacher_dtype="int8"),
    "chunked+bf16": dict(chunked_loss=True, teacher_dtype="bf16"),
    "chunked+compile": dict(chunked_loss=True, compile=True),
    "cache": dict(chunked_loss=True, teacher_cache=CACHE),
    # bf16 products (AVX512-BF16 or AMX on a CPU): the student under autocast, the teacher in bf16;
    # compared with the reference under the same autocast.
    "transformers+bf16": {"reference": True, "autocast": "bf16"},
    "bf16": dict(chunked_loss=True, precision="bf16", teacher_dtype="bf16"),
    "cache+bf16": dict(chunked_loss=True, teacher_cache=CACHE, precision="bf16"),
}
MEMORY_LIMIT = 24 * 2**30
MEMORY_BATCH = (32, 1024)


# ----------------------------------------------------------------------------------------------
# Setup: data and models, once per shape


def prepare(workdir: Path, shape: dict) -> dict[str, str]:
    """A GPT-2-tokenized data folder, a random GPT-2 teacher of `shape` and its half-depth student."""
    import transformers

    from distillery.distill.data import prepare_corpus
    from distillery.distill.student import make_student
    from distillery.models import load_model
    from distillery.tokenizer import load_tokenizer

    vocab = SHARED / "tokenizers" / "gpt2"
    if not (vocab / "vocab.json").is_file():
        sys.exit(f"GPT-2's vocab.json is not in {vocab}; set DISTILLERY_SHARED_DATA to the shared data folder.")
    name = f"{shape['n_layer']}x{shape['n_embd']}"
    teacher_dir, student_dir, data_dir = workdir / f"teacher-{name}", workdir / f"student-{name}", workdir / "data"
    if not (teacher_dir / "config.json").is_file():
        hf = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=shape["n_embd"],
                                     n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(hf).save_pretrained(teacher_dir)
        make_student(load_model(teacher_dir)).save_pretrained(student_dir)
        for folder in (teacher_dir, student_dir):
            for file in ("vocab.json", "merges.txt"):
                shutil.copy(vocab / file, folder / file)
    if not (data_dir / "meta.json").is_file():
        books = sorted((SHARED / "text" / "books").glob("*.txt"))[:BOOKS]
        prepare_corpus(books, load_tokenizer(teacher_dir), data_dir, val_docs=1, progress=False)
    return {"teacher": str(teacher_dir), "student": str(student_dir), "data": str(data_dir)}


# ----------------------------------------------------------------------------------------------
# One configuration, in a child process


def run_child(spec: dict) -> dict:
    if spec.get("memory_limit"):
        resource.setrlimit(resource.RLIMIT_AS, (spec["memory_limit"], spec["memory_limit"]))
    try:
        result = run_reference(spec) if spec["settings"].get("reference") else run_distillery(spec)
        result["ok"] = True
    except (MemoryError, RuntimeError) as e:  # out of memory under the limit, most likely
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_distillery(spec: dict) -> dict:
    """The trainer's own loop for warmup + steps steps; per-step times from its metrics.jsonl."""
    from distillery.distill.run_config import RunConfig
    from distillery.distill.trainer import run

    steps = spec["warmup"] + spec["steps"]
    settings = {"precision": "fp32", **spec["settings"]}
    teacher = None if settings.get("teacher_cache") else spec["teacher"]  # a cache replaces the teacher
    config = RunConfig(kind="distill", teacher=teacher, student=spec["student"], data=spec["data"],
                       out=spec["out"], max_steps=steps, batch_size=spec["batch_size"], seq_len=spec["seq_len"],
                       warmup_steps=1, eval_every=steps, save_every=steps, log_every=1, eval_batches=1, plot=False,
                       device=spec["device"], **settings)
    run(config, progress=False)
    records = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    tokens = spec["batch_size"] * spec["seq_len"]
    # tokens_per_s is cumulative over training time only (no evaluation, no checkpoints).
    train_seconds = [r["step"] * tokens / r["tokens_per_s"] for r in records]
    step_seconds = [b - a for a, b in zip([0.0] + train_seconds, train_seconds)]
    return {"first_loss": records[0]["loss"], "step_seconds": step_seconds}


def run_reference(spec: dict) -> dict:
    """The same distillation written directly on transformers' GPT2LMHeadModel, same batches."""
    import transformers

    from distillery.distill.data import TokenDataset
    from distillery.distill.run_config import RunConfig
    from distillery.distill.trainer import make_optimizer

    device = torch.device(spec["device"])
    config = RunConfig()
    autocast = spec["settings"].get("autocast") == "bf16"
    teacher = transformers.GPT2LMHeadModel.from_pretrained(spec["teacher"]).to(device).eval().requires_grad_(False)
    student = transformers.GPT2LMHeadModel.from_pretrained(spec["student"]).to(device).train()
    optimizer = make_optimizer(student, config)
    data = TokenDataset(spec["data"], "train")
    generator = torch.Generator().manual_seed(config.seed)  # the trainer's batches
    step_seconds, first_loss = [], None
    for _ in range(spec["warmup"] + spec["steps"]):
        ids = data.batch(spec["batch_size"], spec["seq_len"], generator).to(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = reference_step(teacher, student, optimizer, ids, config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - started)
        first_loss = loss if first_loss is None else first_loss
    return {"first_loss": first_loss, "step_seconds": step_seconds}


def reference_step(teacher, student, optimizer, ids: torch.Tensor, config) -> float:
    inputs, targets = ids[:, :-1], ids[:, 1:]
    T = config.temperature
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


# ----------------------------------------------------------------------------------------------
# The parent: one child per configuration, a table at the end


def launch(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"ok": False, "error": f"exit {proc.returncode}: {tail[:200]}"}


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return MEMORY_LIMIT


def table(title: str, rows: dict[str, dict], tokens: int, warmup: int) -> None:
    print(f"\n{title}")
    print(f"  {'configuration':<17} {'tokens/s':>9} {'x ref':>6} {'peak RSS':>10} {'x ref':>6} "
          f"{'first loss':>11} {'rel. diff':>10}")
    for name, r in rows.items():
        # Each row against the reference of its precision.
        bf16 = CONFIGS[name].get("precision") == "bf16" or CONFIGS[name].get("autocast") == "bf16"
        ref = rows.get("transformers+bf16" if bf16 else "transformers", {})
        ref_speed = ref.get("tokens_per_s")
        if not r.get("ok"):
            print(f"  {name:<17} failed: {r.get('error')}")
            continue
        speed = r["tokens_per_s"]
        ratio = f"{speed / ref_speed:.2f}" if ref_speed else "-"
        mem_ratio = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref.get("ok") else "-"
        same_loss = not CONFIGS[name].get("teacher_cache")  # the cache's KD is the sparse one
        diff = f"{abs(r['first_loss'] - ref['first_loss']) / abs(ref['first_loss']):.1e}" \
            if ref.get("ok") and same_loss else "-"
        print(f"  {name:<17} {speed:>9,.0f} {ratio:>6} {r['peak_rss_mb']:>7,.0f} MB {mem_ratio:>6} "
              f"{r['first_loss']:>11.6f} {diff:>10}")
    print(f"  tokens/s: {tokens} tokens / median step after {warmup} warm-up step(s); peak RSS of the whole process")
    if "cache" in rows or "cache+bf16" in rows:
        print(f"  cache: its soft-target loss is the sparse KD over the stored top-{CACHE_TOP_K} "
              "(first loss not comparable)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="vocab,gpt2", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--configs", help=f"comma-separated, of {', '.join(CONFIGS)} (default: all that apply)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation included)")
    parser.add_argument("--memory-check", action="store_true",
                        help=f"one {MEMORY_BATCH[0]} x {MEMORY_BATCH[1]} step on the gpt2 shape, chunked and plain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", help="keep models, data and runs here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return

    names = args.configs.split(",") if args.configs else \
        [n for n in CONFIGS if args.device == "cpu" or n != "chunked+int8"]  # int8 teachers run on CPUs
    unknown = [n for n in names if n not in CONFIGS] + [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown configuration or shape {', '.join(unknown)}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-distill-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; work in {workdir}")
    try:
        for shape_name in args.shapes.split(","):
            shape = SHAPES[shape_name]
            paths = prepare(workdir, shape)
            rows, cache = {}, None
            for name in names:
                out = workdir / "runs" / f"{shape_name}-{name}"
                shutil.rmtree(out, ignore_errors=True)
                settings = CONFIGS[name]
                if settings.get("teacher_cache") == CACHE:  # built once per shape, for every cache row
                    cache = cache or build_teacher_cache(workdir, shape_name, shape, paths, args.warmup + args.steps,
                                                         args.device)
                    settings = {**settings, "teacher_cache": cache}
                spec = {**paths, **shape, "device": args.device, "steps": args.steps, "warmup": args.warmup,
                        "out": str(out), "settings": settings}
                rows[name] = r = launch(spec)
                if r.get("ok"):
                    timed = r["step_seconds"][args.warmup:] or r["step_seconds"]
                    r["tokens_per_s"] = shape["batch_size"] * shape["seq_len"] / statistics.median(timed)
                print(f"  {shape_name} {name}: " + (f"{r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_rss_mb']:,.0f} MB"
                                                  if r.get("ok") else f"failed ({r['error']})"), flush=True)
            student_layers = max(1, shape["n_layer"] // 2)
            table(f"{shape_name}: teacher {shape['n_layer']} x {shape['n_embd']} -> student {student_layers} layers, "
                  f"vocabulary 50257, batch {shape['batch_size']} x {shape['seq_len']}", rows,
                  shape["batch_size"] * shape["seq_len"], args.warmup)
        if args.memory_check:
            memory_check(workdir, args)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def build_teacher_cache(workdir: Path, shape_name: str, shape: dict, paths: dict, steps: int, device: str) -> str:
    """The teacher's top-k over as many training windows as the run reads (`distillery teacher-cache`),
    and its last hidden states (the cosine loss), built once per shape and outside the timed run."""
    from distillery.distill.teacher_cache import build_cache

    out = workdir / f"cache-{shape_name}"
    started = time.perf_counter()
    summary = build_cache(paths["teacher"], paths["data"], out, CACHE_TOP_K, seq_len=shape["seq_len"], hidden=True,
                          windows=steps * shape["batch_size"], batch_size=shape["batch_size"], device=device,
                          overwrite=True, progress=False)
    print(f"  {shape_name} teacher cache: top-{CACHE_TOP_K}, {summary.get('windows', '?')} windows, "
          f"built in {time.perf_counter() - started:.0f} s (not timed below)", flush=True)
    return str(out)


def memory_check(workdir: Path, args: argparse.Namespace) -> None:
    """One step at 32 x 1024 on the gpt2 shape, chunked then plain, each under the memory limit."""
    limit = min(MEMORY_LIMIT, int(0.9 * available_memory()))
    paths = prepare(workdir, SHAPES["gpt2"])
    batch, seq = MEMORY_BATCH
    print(f"\nmemory: gpt2 shape, batch {batch} x {seq}, one step, address space limited to {limit / 2**30:.1f} GiB")
    for name in ("chunked", "plain"):
        out = workdir / "runs" / f"memory-{name}"
        shutil.rmtree(out, ignore_errors=True)
        r = launch({**paths, "batch_size": batch, "seq_len": seq, "device": args.device, "steps": 1, "warmup": 0,
                    "out": str(out), "settings": CONFIGS[name], "memory_limit": limit})
        print(f"  {name:<8} " + (f"fits: peak RSS {r['peak_rss_mb'] / 1024:.1f} GiB, one step {r['step_seconds'][0]:.0f} s"
                                 if r.get("ok") else f"does not fit ({r['error']})"))
    if limit < MEMORY_LIMIT:
        print(f"  (the limit is under 24 GiB: only {available_memory() / 2**30:.1f} GiB are free here)")


if __name__ == "__main__":
    main()
