"""How fast distillery runs a model on this machine, next to transformers on the same weights.

Decoding one token at batch 1 reads every weight once, so its speed limit is
`memory bandwidth / bytes of weights read per token`. `run_bench` measures that bandwidth, then for
each model and dtype: decode tokens/s at each batch size, time to first token, a full forward pass,
fill-mask latency (masked-LM models) and memory, with the fraction of the bandwidth limit reached;
and, where transformers is installed, its figures on the same weights in the same run. Numbers are
best-of-N wall-clock times, since on a shared machine the minimum is the least noisy estimate.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from distillery.generation.quantize import (
    QUANTIZE_DTYPES,
    InferenceLinear,
    Int8Linear,
    int8_linear_bytes,
    quantize_model,
    to_inference_layout,
)
from distillery.models.common import DistilleryError, Pretrained

PRESET_PREFIX = "preset:"


@dataclass
class BenchSettings:
    dtypes: tuple[str, ...] = ("fp32",)
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_tokens: int = 16
    new_tokens: int = 32
    forward_shape: tuple[int, int] = (8, 256)  # (batch, tokens) of the full-forward measurement
    repeats: int = 3
    reference: bool = True  # also time transformers on the same weights
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    inference_layout: bool = True  # float weights prepacked / transposed for decoding (see quantize.py)
    bandwidth_megabytes: int = 256  # size of the tensor read to measure bandwidth (>> CPU caches)
    device: str = "cpu"  # "cuda" (or "cuda:N") runs everything on that GPU
    cuda_graphs: bool = False  # our decode steps replayed as a CUDA graph (CUDA only)
    compile: bool = False  # our decode steps through torch.compile (engine.compiled_decode_step)

    def __post_init__(self) -> None:
        for d in self.dtypes:
            if d not in QUANTIZE_DTYPES:
                raise DistilleryError(f"--dtype {d!r} is not supported; choose from {', '.join(QUANTIZE_DTYPES)}.")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise DistilleryError(f"--device {self.device!r} is not a device torch knows; use cpu or cuda.") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DistilleryError(f"--device {self.device}: torch {torch.__version__} sees no CUDA GPU here; "
                                  "run on a machine with one, or leave --device out to bench the CPU.")
        if device.type not in ("cpu", "cuda"):
            raise DistilleryError(f"--device {self.device!r}: the bench runs on cpu or cuda.")
        if self.cuda_graphs and self.compile:
            raise DistilleryError("Choose --compile or --cuda-graphs for our decode steps, not both.")
        if self.cuda_graphs and device.type != "cuda":
            raise DistilleryError("--cuda-graphs needs --device cuda; CUDA graphs exist on NVIDIA GPUs only.")
        if device.type != "cpu" and "int8" in self.dtypes:
            raise DistilleryError("--dtype int8 runs on the CPU only (FBGEMM kernels); bench a GPU with fp32 or bf16.")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DistilleryError("--batch needs positive batch sizes, e.g. --batch 1,8.")
        if self.new_tokens < 2:
            raise DistilleryError("--new-tokens must be at least 2 (the first token is timed separately).")
        if self.prompt_tokens < 1 or min(self.forward_shape) < 1 or self.repeats < 1:
            raise DistilleryError("--prompt-tokens, --forward-shape and --repeats must be positive.")


# ----------------------------------------------------------------------------------------------
# Machine


def measure_bandwidth(megabytes: int = 256, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in GB/s: summing a tensor far larger than the caches (CPU or GPU)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    seconds = best_time(lambda: x.sum(), repeats, device=device)
    return x.numel() * 4 / seconds / 1e9


def best_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """The fastest of `repeats` calls of `fn`, in seconds (after `warmup` untimed calls). On a GPU
    each call is timed from an idle device until its work has finished."""
    def sync() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# Models


def load_bench_model(spec: str, task: str | None = None) -> Pretrained:
    """A model folder or hub id, or `preset:NAME` (a preset shape with random weights)."""
    from distillery.models import build_model, load_model, preset_config

    if not spec.startswith(PRESET_PREFIX):
        return load_model(spec, task=task).eval()
    check_preset(spec)
    torch.manual_seed(0)
    return build_model(preset_config(spec[len(PRESET_PREFIX):]), task).eval()


def check_preset(spec: str) -> None:
    """Refuse `preset:NAME` for a NAME that is no preset, naming the choices; other specs pass."""
    from distillery.models.checkpoint import preset_names

    name = spec[len(PRESET_PREFIX):]
    if spec.startswith(PRESET_PREFIX) and name not in preset_names():
        raise DistilleryError(f"Unknown preset {name!r}; choose one of {preset_names()} (as {PRESET_PREFIX}NAME).")


def bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every linear layer and LayerNorm, once.

    Embedding tables are left out (a token reads one row of them), except where a tied LM head
    reads the whole table, which is counted through the head.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):  # packed weights: neither parameters nor buffers
            total += int8_linear_bytes(module)
        elif isinstance(module, InferenceLinear):
            total += module.weight_bytes()
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def weights_mb(model: nn.Module) -> float:
    """Memory held by the model's parameters and buffers (tied tensors once) and int8 layers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    total += sum(int8_linear_bytes(m) for m in model.modules() if isinstance(m, Int8Linear))
    total += sum(m.onednn_weight.element_size() * m.in_features * m.out_features  # not parameters either
                 for m in model.modules() if isinstance(m, InferenceLinear) and m.layout == "onednn-packed")
    return total / 2**20


def hf_copy(model: Pretrained, dtype: str) -> nn.Module:
    """transformers' model for the same weights (fp32 weights for int8, which it has no equal of)."""
    import transformers

    from distillery.models.checkpoint import TASK_ARCHITECTURES, to_hf

    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf())
    cls = getattr(transformers, TASK_ARCHITECTURES[(model.family, model.task)])
    hf = cls(hf_config)
    missing, unexpected = hf.load_state_dict(to_hf(model), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k or "decoder" in k or "vocab_projector" in k for k in missing), missing  # tied heads only
    hf.tie_weights()
    return hf.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()


# ----------------------------------------------------------------------------------------------
# Decoding


def engine_generate(model: Pretrained, cuda_graphs: bool = False,
                    compile: bool = False) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """distillery's greedy decoding (the engine's prefill + decode steps), exactly N new tokens."""
    from distillery.generation.config import GenerationConfig
    from distillery.generation.engine import generate

    def run(input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return generate(model, input_ids, config=GenerationConfig(max_new_tokens=new_tokens),
                        compile=compile, cuda_graphs=cuda_graphs)
    return run


def hf_generate(hf: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def generate(input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=hf.config.eos_token_id)
    return generate


def time_decoding(generate: Callable[[torch.Tensor, int], Any], input_ids: torch.Tensor, new_tokens: int,
                  repeats: int) -> dict[str, float]:
    """Time to first token, and decode tokens/s from the difference between N and 1 new tokens."""
    first = best_time(lambda: generate(input_ids, 1), repeats, device=input_ids.device)
    full = best_time(lambda: generate(input_ids, new_tokens), repeats, device=input_ids.device)
    per_step = max(full - first, 1e-9) / (new_tokens - 1)
    return {"ttft_ms": first * 1e3, "ms_per_step": per_step * 1e3,
            "tokens_per_s": input_ids.size(0) / per_step}


def time_forward(model: nn.Module, input_ids: torch.Tensor, repeats: int) -> float:
    """Milliseconds for one full forward pass (logits at every position)."""
    with torch.inference_mode():
        return best_time(lambda: model(input_ids), repeats, device=input_ids.device) * 1e3


def time_fill_mask(model: nn.Module, input_ids: torch.Tensor, mask_pos: torch.Tensor, ours: bool,
                   repeats: int) -> float:
    """Milliseconds for one fill-mask call at the model level: forward, then top-5 at the masks."""
    def call():
        if ours:
            logits = model(input_ids, logits_positions=mask_pos).logits
        else:
            logits = model(input_ids).logits[mask_pos]
        return logits.softmax(-1).topk(5)

    with torch.inference_mode():
        return best_time(call, max(repeats, 5), device=input_ids.device) * 1e3


# ----------------------------------------------------------------------------------------------
# The bench


def fit_to_positions(settings: BenchSettings, model: Pretrained, spec: str) -> BenchSettings:
    """`settings` with the forward shape's tokens and prompt + new tokens lowered to what the model's
    positions hold (a 128-position model cannot run the default 8x256 forward); said once on stderr."""
    config = model.config
    positions = next((getattr(config, name) for name in ("n_positions", "max_tokens", "max_position_embeddings")
                      if isinstance(getattr(config, name, None), int)), None)
    if positions is None:
        return settings
    batch, tokens = settings.forward_shape
    prompt = min(settings.prompt_tokens, max(1, positions - 2))
    new = min(settings.new_tokens, positions - prompt) if model.family == "gpt2" else settings.new_tokens
    fitted = replace(settings, forward_shape=(batch, min(tokens, positions)), prompt_tokens=prompt,
                     new_tokens=max(new, 2))
    if fitted != settings:
        print(f"note: {spec} has {positions} positions; measuring a {batch}x{fitted.forward_shape[1]} forward, "
              f"{fitted.prompt_tokens} prompt tokens and {fitted.new_tokens} new tokens", file=sys.stderr)
    return fitted


def bench_model(spec: str, dtype: str, settings: BenchSettings, bandwidth_gbs: float,
                progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """All figures for one model in one dtype (see `run_bench`)."""
    device = torch.device(settings.device)
    model = load_bench_model(spec)
    parameters = model.num_parameters()  # before quantising, which turns weights into buffers
    reference = None
    if settings.reference and _transformers_available():
        reference = hf_copy(model, dtype).to(device)
    model = quantize_model(model, dtype).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    layout = "int8" if dtype == "int8" else "linear"
    compiled = settings.compile and model.family == "gpt2" and dtype != "int8"  # int8 runs slower compiled
    if compiled and device.type == "cpu":
        layout = "linear, compiled"  # torch.compile lays the weights out itself (compiled_decode_step)
    elif dtype != "int8" and settings.inference_layout and device.type == "cpu":
        to_inference_layout(model)
        layouts = {m.layout for m in model.modules() if isinstance(m, InferenceLinear)}
        layout = "onednn-packed" if "onednn-packed" in layouts else "input-major"
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    settings = fit_to_positions(settings, model, spec)
    row: dict[str, Any] = {
        "model": spec, "family": model.family, "task": model.task, "dtype": dtype, "layout": layout,
        "parameters": parameters, "weights_mb": round(weights_mb(model), 1),
        "bytes_per_token_mb": round(bytes_read_per_token(model) / 2**20, 1),
    }
    B, T = settings.forward_shape
    ids = torch.randint(3, vocab, (B, T), generator=gen).to(device)
    progress(f"{spec} {dtype}: forward {B}x{T}")
    row["forward_ms"] = time_forward(model, ids, settings.repeats)
    if reference is not None:
        row["reference_forward_ms"] = time_forward(reference, ids, settings.repeats)
        row["forward_speedup"] = row["reference_forward_ms"] / row["forward_ms"]

    if model.family == "gpt2":
        row["decode"] = {}
        for batch in settings.batch_sizes:
            progress(f"{spec} {dtype}: decode batch {batch}")
            prompt = torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=gen).to(device)
            ours = engine_generate(model, settings.cuda_graphs, compiled)
            compile_s = None
            if compiled:  # the first decode step of a batch size compiles; time it on its own
                started = time.perf_counter()
                ours(prompt, 2)
                compile_s = time.perf_counter() - started
            result = time_decoding(ours, prompt, settings.new_tokens, settings.repeats)
            if compile_s is not None:
                result["compile_s"] = compile_s
            if batch == 1:
                limit = bandwidth_gbs * 1e9 / bytes_read_per_token(model)
                result["bandwidth_limit_tokens_per_s"] = limit
                result["fraction_of_bandwidth_limit"] = result["tokens_per_s"] / limit
            if reference is not None:
                ref = time_decoding(hf_generate(reference), prompt, settings.new_tokens, settings.repeats)
                result["reference"] = ref
                result["speedup"] = result["tokens_per_s"] / ref["tokens_per_s"]
            kv_bytes = 2 * model.config.n_layer * batch * (settings.prompt_tokens + settings.new_tokens)
            result["kv_cache_mb"] = kv_bytes * model.config.n_embd * model.dtype.itemsize / 2**20
            row["decode"][str(batch)] = result
    elif model.task == "masked-lm":
        progress(f"{spec} {dtype}: fill-mask")
        ids = torch.randint(3, vocab, (1, settings.prompt_tokens), generator=gen)
        if getattr(model.config, "bos_token_id", None) is not None:  # RoBERTa's <s> ... </s>; BERT's are not in its config
            ids[0, 0], ids[0, -1] = model.config.bos_token_id, model.config.eos_token_id
        mask_pos = torch.zeros_like(ids, dtype=torch.bool)
        mask_pos[0, settings.prompt_tokens // 2] = True
        ids, mask_pos = ids.to(device), mask_pos.to(device)
        row["fill_mask_ms"] = time_fill_mask(model, ids, mask_pos, True, settings.repeats)
        if reference is not None:
            row["reference_fill_mask_ms"] = time_fill_mask(reference, ids, mask_pos, False, settings.repeats)
            row["fill_mask_speedup"] = row["reference_fill_mask_ms"] / row["fill_mask_ms"]
    row["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if device.type == "cuda":
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del model, reference
    gc.collect()
    return row


def run_bench(specs: list[str], settings: BenchSettings,
              progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Bandwidth, then every (model, dtype) row, then student-vs-teacher ratios.

    Ratios compare each model with the largest one of its family benchmarked (the teacher) in the
    same dtype: `forward_speedup` for the full forward pass, `decode_speedup` at batch 1 (causal
    LMs) and `fill_mask_speedup` (masked LMs).
    """
    if not specs:
        raise DistilleryError("Name at least one model to bench (a folder, hub id or preset:NAME).")
    for spec in specs:
        check_preset(spec)  # before minutes of measuring
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        progress("memory bandwidth")
        bandwidth = measure_bandwidth(settings.bandwidth_megabytes, device=settings.device)
        rows = [bench_model(spec, dtype, settings, bandwidth, progress)
                for spec in specs for dtype in settings.dtypes]
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "machine": {"bandwidth_gb_per_s": bandwidth, "threads": settings.threads or previous_threads,
                    "torch": torch.__version__, "cpu_count": _cpu_count(), "device": _device_name(settings.device)},
        "settings": {"device": settings.device, "dtypes": list(settings.dtypes),
                     "batch_sizes": list(settings.batch_sizes),
                     "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
                     "forward_shape": list(settings.forward_shape), "repeats": settings.repeats,
                     "inference_layout": settings.inference_layout, "cuda_graphs": settings.cuda_graphs,
                     "compile": settings.compile},
        "results": rows,
        "student_vs_teacher": student_vs_teacher(rows),
    }


def student_vs_teacher(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each smaller model against the largest one of its family in the same dtype."""
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for family in ("gpt2", "roberta"):
            same = [r for r in rows if r["dtype"] == dtype and r["family"] == family]
            if len(same) < 2:
                continue
            teacher = max(same, key=lambda r: r["parameters"])
            for student in same:
                if student is teacher:
                    continue
                entry = {"student": student["model"], "teacher": teacher["model"], "dtype": dtype,
                         "forward_speedup": teacher["forward_ms"] / student["forward_ms"]}
                if "1" in student.get("decode", {}) and "1" in teacher.get("decode", {}):
                    entry["decode_speedup"] = (student["decode"]["1"]["tokens_per_s"]
                                               / teacher["decode"]["1"]["tokens_per_s"])
                if "fill_mask_ms" in student and "fill_mask_ms" in teacher:
                    entry["fill_mask_speedup"] = teacher["fill_mask_ms"] / student["fill_mask_ms"]
                out.append(entry)
    return out


def format_report(report: dict[str, Any]) -> str:
    """The bench as a few human-readable lines."""
    m = report["machine"]
    where = f"{m['threads']} threads" if m.get("device", "cpu") == "cpu" else m["device"]
    lines = [f"memory bandwidth {m['bandwidth_gb_per_s']:.1f} GB/s, {where}, torch {m['torch']}"]
    for r in report["results"]:
        head = f"{r['model']} [{r['dtype']}] {r['parameters'] / 1e6:.1f}M params, {r['weights_mb']:.0f} MB"
        lines.append(head)
        fwd = f"  forward {'x'.join(map(str, report['settings']['forward_shape']))}: {r['forward_ms']:.1f} ms"
        if "reference_forward_ms" in r:
            fwd += f" (transformers {r['reference_forward_ms']:.1f} ms, {r['forward_speedup']:.2f}x)"
        lines.append(fwd)
        for batch, d in r.get("decode", {}).items():
            line = f"  decode batch {batch}: {d['tokens_per_s']:.1f} tok/s, first token {d['ttft_ms']:.1f} ms"
            if "compile_s" in d:
                line += f" (compiled in {d['compile_s']:.0f} s)"
            if "fraction_of_bandwidth_limit" in d:
                line += f", {100 * d['fraction_of_bandwidth_limit']:.0f}% of bandwidth limit"
            if "reference" in d:
                line += f" (transformers {d['reference']['tokens_per_s']:.1f} tok/s, {d['speedup']:.2f}x)"
            lines.append(line)
        if "fill_mask_ms" in r:
            line = f"  fill-mask: {r['fill_mask_ms']:.1f} ms"
            if "reference_fill_mask_ms" in r:
                line += f" (transformers {r['reference_fill_mask_ms']:.1f} ms, {r['fill_mask_speedup']:.2f}x)"
            lines.append(line)
        memory = f"  peak RSS so far {r['peak_rss_mb']:.0f} MB"
        if "peak_gpu_mb" in r:
            memory += f", GPU memory {r['peak_gpu_mb']:.0f} MB"
        lines.append(memory)
    for s in report["student_vs_teacher"]:
        line = f"{s['student']} vs {s['teacher']} [{s['dtype']}]: forward {s['forward_speedup']:.2f}x"
        if "decode_speedup" in s:
            line += f", decode {s['decode_speedup']:.2f}x"
        if "fill_mask_speedup" in s:
            line += f", fill-mask {s['fill_mask_speedup']:.2f}x"
        lines.append(line)
    return "\n".join(lines)


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



def perplexity_by_dtype(model_dir: str, text: str, dtypes: tuple[str, ...] = QUANTIZE_DTYPES,
                        max_length: int | None = None, stride: int | None = None) -> dict[str, Any]:
    """What smaller weights cost in quality: perplexity of one model on `text` in each dtype.

    Returns {"perplexity": {dtype: value}, "relative_to_fp32": {dtype: ppl / ppl_fp32}} (the
    latter when fp32 is among `dtypes`). The model is loaded afresh for each dtype.
    """
    from distillery.evaluate.perplexity import perplexity
    from distillery.models import load_model
    from distillery.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    values = {}
    for dtype in dtypes:
        model = quantize_model(load_model(model_dir), dtype)
        values[dtype] = perplexity(model, tokenizer, text, max_length=max_length, stride=stride)["perplexity"]
    out: dict[str, Any] = {"perplexity": values}
    if "fp32" in values:
        out["relative_to_fp32"] = {d: v / values["fp32"] for d, v in values.items()}
    return out
