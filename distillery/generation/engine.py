"""The decoding loop: prefill, one-token decode steps, EOS handling. Knows nothing about text.

    tokens = generate(model, input_ids, attention_mask, GenerationConfig(max_new_tokens=20))

The model is anything with `new_cache(batch, max_length)` and a forward taking
`(input_ids, attention_mask=, cache=, logits_to_keep=)` that returns `.logits` (distillery's GPT2).
The KV cache is preallocated for the whole run, the LM head runs at the last position only, and
batches are left-padded: the attention mask hides the pads and positions count real tokens only, so
each row yields exactly the tokens it yields alone.

Behaviour follows transformers' `generate` (greedy search and multinomial sampling): the prompt
batch is expanded with repeat_interleave for `num_return_sequences`; scores are float32; every row
is sampled at every step (finished ones too, so the random stream is the one transformers
consumes); a finished row then gets `pad_token_id`; the loop ends when every row has finished or the
length limit is reached.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from distillery.generation.config import GenerationConfig
from distillery.generation.quantize import Int8Linear
from distillery.generation.sampling import process_logits, sample_next
from distillery.models.common import ConfigError, DistilleryError, KVCache

# Called after each step with the (B,) tokens just chosen; returns (B,) bool: rows that end here.
StopCheck = Callable[[torch.Tensor], torch.Tensor]


def check_step_options(model: nn.Module, compile: bool, cuda_graphs: bool) -> None:
    """Refuse decode-step settings that cannot run (or would only be slower) for `model`, in one sentence."""
    if cuda_graphs and compile:
        raise ConfigError("Choose torch.compile or CUDA graphs for the decode steps, not both.")
    if compile and any(isinstance(m, Int8Linear) for m in model.modules()):
        # Measured: distilgpt2 int8 decoding fell from about 200 to 124 tokens/s compiled.
        raise ConfigError("torch.compile makes int8 decoding slower (FBGEMM's int8 layers do not compile); "
                          "use compile with fp32 weights, or int8 without compile.")
    if cuda_graphs and model.device.type != "cuda":
        raise ConfigError("CUDA graphs need the model on a CUDA GPU; load it with device='cuda' (--device cuda) "
                          "or leave CUDA graphs off.")


def prefill(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache
) -> torch.Tensor:
    """Run the whole prompt (B, T) through the model, filling `cache`; return (B, V) float32 logits
    for the token after it."""
    out = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_step(
    model: nn.Module, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Feed one token per row (B,) after what `cache` holds; return (B, V) float32 next-token logits.

    `attention_mask` (B, cache.length + 1) is needed only when the batch holds padding.
    """
    out = model(tokens[:, None], attention_mask=attention_mask, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


# What torch.compile is told for a model on a CPU: fold the weights into the compiled code as
# constants ("freezing"), so that inductor packs them for its own C++ GEMM template ("CPP"), which
# streams them at the memory's speed. Measured on the 2-core AVX2 CPU, distilgpt2 shape, batch 1,
# same process: a decode step of 9.8 ms against 12.4 ms eager (oneDNN with prepacked weights); 24
# block products in 4.3 ms against 6.9 ms. Plain torch.compile calls the same oneDNN and MKL
# kernels as eager and gained nothing; timing the template against ATen's kernels as well
# ("CPP,ATEN") chose the template every time and tripled the compile time. The options must be on
# while dynamo traces, not only in inductor, so they are switched on around each call (14 us)
# rather than given to torch.compile.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                       "autotune_num_choices_displayed": 0}


def compile_with_frozen_weights(fn: Callable, device: torch.device) -> Callable:
    """`fn` (a pass of a model on `device`) through torch.compile with dynamic shapes. On a CPU,
    `CPU_COMPILE_OPTIONS` are on around each call, and inductor failing to build its C++ kernels
    (no working compiler) becomes one sentence; elsewhere it is plain torch.compile."""
    compiled = torch.compile(fn, dynamic=True)
    if device.type != "cpu":
        return compiled
    from torch._inductor import config as inductor_config
    from torch._inductor.exc import InductorError

    options = inductor_config.patch(CPU_COMPILE_OPTIONS)

    def call(*args: Any) -> Any:
        try:
            with options:
                return compiled(*args)
        except InductorError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistilleryError(f"torch.compile could not build the decode step ({reason}); install a "
                                  "working C++ compiler (g++) or leave compile off.") from e
    return call


def compiled_decode_step(model: nn.Module) -> Callable:
    """`decode_step` through `torch.compile` for `model`, made on first use and kept on the model.

    Dynamic shapes, as the cache grows every step. The first call compiles (15-25 s for distilgpt2
    on a 2-core CPU; inductor keeps what it can on disk for later processes), and so does the
    first call with another batch size or with padding. On a CPU the compiled code holds its own
    packed copy of the weights (`CPU_COMPILE_OPTIONS`), so it costs their memory again and does
    not see later changes to them: a model whose weights changed since is refused. Only plain
    `nn.Linear` layers gain; distillery's inference layout (`quantize.to_inference_layout`)
    compiles too but keeps its oneDNN products, which is why pipelines built with `compile=True`
    leave the layers as they are.
    """
    versions = [p._version for p in model.parameters()]  # bumped by every in-place change
    kept = model.__dict__.get("_compiled_decode_step")
    if kept is not None:
        step, compiled_versions = kept
        if model.device.type == "cpu" and versions != compiled_versions:
            raise DistilleryError(
                "The model's weights changed after its decode step was compiled, and the compiled step "
                "keeps the weights it was compiled with; load the model again to compile it anew, or "
                "leave compile off."
            )
        return step
    # Dynamo keeps compiled code, and its limit of 8 recompilations, per code object; compiling a
    # copy of decode_step's gives each model its own instead of all models sharing one.
    own_copy = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, decode_step.__name__,
                                  decode_step.__defaults__)
    step = compile_with_frozen_weights(own_copy, model.device)
    model.__dict__["_compiled_decode_step"] = (step, versions)
    return step


class FixedShapeDecodeStep:
    """Decode steps with the same shapes every time, so that one CUDA graph can replay them all.

    A graph replays the kernels it recorded on the tensors it recorded them on, so everything that
    changes from step to step lives in tensors this object owns and updates in place: the tokens,
    their positions, the cache slot written (the cache's `write_at`) and a mask over all the
    cache's slots saying which hold tokens. The model attends over every slot of the cache, not
    just the filled ones, which costs little on a GPU and keeps the shapes fixed.

    `prefill` runs a prompt into the cache; then each call, made as `decode_step` is, returns the
    same (B, V) logits as `decode_step` would (up to float rounding). With `graph` (CUDA only) the
    first call records the step into a `torch.cuda.CUDAGraph` and every later call, for this
    prompt or the next ones, replays it; without, each call runs the step eagerly, which is how
    the tests check the fixed-shape step on a CPU.
    """

    def __init__(self, model: nn.Module, cache: KVCache, graph: bool) -> None:
        B, device = cache.batch_size, cache.device
        check_step_options(model, compile=False, cuda_graphs=graph)
        self.model, self.cache, self.graph = model, cache, graph
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slots_in_use = torch.zeros(B, cache.max_length, dtype=torch.bool, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.write_at = torch.zeros((), dtype=torch.long, device=device)
        self.recorded: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the recorded step's output

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Run the prompts (B, T) into the emptied cache, as `prefill` does, and point the step's
        tensors at them (in place: a recorded graph keeps reading the same tensors)."""
        T = input_ids.size(1)
        self.cache.length, self.cache.write_at = 0, None  # the prompt takes the growing-cache path
        logits = prefill(self.model, input_ids, attention_mask, self.cache)
        self.slots_in_use.zero_()
        self.slots_in_use[:, :T] = True if attention_mask is None else attention_mask.bool()
        self.positions.copy_(self.slots_in_use.sum(-1, keepdim=True))  # real tokens so far: the next position
        self.cache.write_at = self.write_at
        return logits

    def _step(self) -> torch.Tensor:
        out = self.model(self.tokens, attention_mask=self.slots_in_use, position_ids=self.positions,
                         cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _record(self) -> None:
        # Warm up on a side stream first, as torch.cuda.graph asks; the warm-up steps write the
        # same keys and values into the same slot as the replay will.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.recorded = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.recorded):
            self.logits = self._step()

    def __call__(self, model: nn.Module, tokens: torch.Tensor, cache: KVCache,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        slot = self.cache.length
        if slot >= self.cache.max_length:
            raise ValueError(f"KV cache holds {self.cache.max_length} positions; {slot + 1} were asked for.")
        self.tokens.copy_(tokens[:, None])
        self.slots_in_use[:, slot] = True  # new tokens are always real
        self.write_at.fill_(slot)
        if not self.graph:
            logits = self._step()
        else:
            if self.recorded is None:
                self._record()
            self.recorded.replay()
            logits = self.logits.clone()  # the next replay overwrites it
        self.cache.length = slot + 1
        self.positions += 1
        return logits


# Recorded decode steps kept per model: the cache length is rounded up to this many positions so
# that prompts of similar lengths share one graph, and a model keeps at most this many graphs.
GRAPH_LENGTH_STEP = 256
GRAPHS_PER_MODEL = 4


def recorded_decode_step(model: nn.Module, batch_size: int, length: int) -> FixedShapeDecodeStep:
    """The model's CUDA-graph decode step for `batch_size` rows of up to `length` tokens, recorded
    on first use and kept on the model for later calls (the oldest goes beyond GRAPHS_PER_MODEL).
    Calls of the same shape share its cache, so a model runs one such generation at a time."""
    rounded = min(-(-length // GRAPH_LENGTH_STEP) * GRAPH_LENGTH_STEP, model.config.n_positions)
    kept: dict[tuple[int, int], FixedShapeDecodeStep] = model.__dict__.setdefault("_recorded_decode_steps", {})
    key = (batch_size, rounded)  # length <= n_positions: stream checked it
    if key not in kept:
        if len(kept) >= GRAPHS_PER_MODEL:
            del kept[next(iter(kept))]
        kept[key] = FixedShapeDecodeStep(model, model.new_cache(*key), graph=True)
    return kept[key]


@torch.inference_mode()
def stream(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    stop: StopCheck | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B * num_return_sequences,), one step at a time.

    `input_ids` (B, T) are left-padded prompts with `attention_mask` (B, T) (1 = token, 0 = pad);
    rows come out in transformers' order: each prompt's num_return_sequences copies together.
    `stop` may end rows early (stop strings); an ended row yields `pad_token_id` from then on.
    `compile` runs the decode steps through `torch.compile` (see `compiled_decode_step`);
    `cuda_graphs` replays them as one CUDA graph (see `FixedShapeDecodeStep`; CUDA only).
    """
    config = config or GenerationConfig()
    if not hasattr(model, "new_cache"):
        raise DistilleryError(
            f"{type(model).__name__} cannot generate text; load a causal language model (GPT-2 family)."
        )
    check_step_options(model, compile, cuda_graphs)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ConfigError(f"input_ids must have shape (batch, length >= 1), got {tuple(input_ids.shape)}.")
    device = model.device
    input_ids = input_ids.to(device)
    n = config.num_return_sequences
    input_ids = input_ids.repeat_interleave(n, dim=0)
    B, T = input_ids.shape
    if attention_mask is not None:
        attention_mask = attention_mask.to(device).repeat_interleave(n, dim=0)
        if attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}."
            )
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the faster plain-causal path
    new_tokens = config.new_tokens_for(T)
    _check_fits(model, T, new_tokens)
    if new_tokens == 0:
        return

    eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (
        config.eos_token_ids[0] if config.eos_token_ids else None
    )
    seen = _prompt_tokens(input_ids, attention_mask, model) if config.repetition_penalty != 1.0 else None
    # The mask for the whole run, filled as tokens arrive; new tokens are always real (even pads
    # given to finished rows, as in transformers).
    mask = None
    if attention_mask is not None:
        mask = torch.ones(B, T + new_tokens, dtype=attention_mask.dtype, device=device)
        mask[:, :T] = attention_mask

    if cuda_graphs:
        step_fn = recorded_decode_step(model, B, T + new_tokens)
        cache = step_fn.cache
        logits = step_fn.prefill(input_ids, attention_mask)
    else:
        step_fn = compiled_decode_step(model) if compile else decode_step
        cache = model.new_cache(B, T + new_tokens)
        logits = prefill(model, input_ids, attention_mask, cache)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(new_tokens):
        scores = process_logits(logits, seen[:, :-1] if seen is not None else None, config)
        tokens = sample_next(scores, config.greedy)
        if pad_id is not None:
            tokens = torch.where(unfinished, tokens, pad_id)
        yield tokens
        if seen is not None:
            seen[torch.arange(B, device=device), tokens.clamp(max=seen.size(1) - 1)] = True
        if eos.numel():
            unfinished &= ~torch.isin(tokens, eos)
        if stop is not None:
            unfinished &= ~stop(tokens)
        if step == new_tokens - 1 or not bool(unfinished.any()):
            return
        step_mask = mask[:, : T + step + 1] if mask is not None else None
        logits = step_fn(model, tokens, cache, step_mask)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    stop: StopCheck | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """Prompts (B, T) -> (B * num_return_sequences, T + generated) token ids, prompts included.

    Rows that finish early (EOS or `stop`) are padded with `pad_token_id` up to the longest row, as
    transformers' `generate` returns them.
    """
    n = (config or GenerationConfig()).num_return_sequences
    prompts = input_ids.to(model.device).repeat_interleave(n, dim=0)
    steps = list(stream(model, input_ids, attention_mask, config, stop, compile, cuda_graphs))
    if not steps:
        return prompts
    return torch.cat([prompts, torch.stack(steps, dim=1)], dim=1)


def _check_fits(model: nn.Module, prompt_length: int, new_tokens: int) -> None:
    positions = getattr(model.config, "n_positions", None)
    if positions is None or prompt_length + new_tokens <= positions:
        return
    if prompt_length > positions:
        raise ConfigError(
            f"The prompt is {prompt_length} tokens long but the model has only {positions} positions; "
            "shorten the prompt (or truncate it)."
        )
    raise ConfigError(
        f"The prompt ({prompt_length} tokens) plus {new_tokens} new tokens exceeds the model's {positions} "
        f"positions; ask for at most {positions - prompt_length} new tokens (max_new_tokens / max_length)."
    )


def _prompt_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, model: nn.Module) -> torch.Tensor:
    """(B, V + 1) bool: which tokens each prompt holds, left pads not counted (as transformers).

    The extra last column absorbs pads and any id beyond the LM head's vocabulary.
    """
    vocab = model.config.vocab_size
    ids = input_ids.clamp(max=vocab)
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, vocab)
    seen = torch.zeros(input_ids.size(0), vocab + 1, dtype=torch.bool, device=input_ids.device)
    return seen.scatter_(1, ids, True)
