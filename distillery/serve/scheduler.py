"""Continuous batching: one thread owns the queue and the running batch of every served model.

Every dialect turns its request into one `GenerationRequest` and submits it with a
`GenerationHandle`, through which the tokens come back as events. The scheduler thread loops:

1. run the encoder jobs that are waiting (fill-mask, embeddings: one forward each);
2. admit waiting requests at this step boundary: each prompt is prefilled alone, its first token
   sampled, and its keys and values copied into a free row of the model's `BatchCache`;
3. run one decode step per model over all its running rows at once, then sample each row with its
   own settings and its own random generator, and drop finished, cancelled and timed-out rows at once.

Each row keeps its own length in the batch cache (no left padding, no realignment when a row
joins or leaves): a decode step writes row i's new key at slot length_i and attends over slots
0..length_i, at position length_i. The model runs this as its fixed-slot step (`KVCache.write_at`,
here one slot per row), the same code a CUDA graph replays. Sampling uses a `torch.Generator` per
request seeded with the request's seed, and the processors of `generation.sampling`, so a seeded
request draws the same tokens alone, among strangers, or from the text-generation pipeline after
`set_seed` (up to float rounding of a batched matrix product, which has not changed a token in
the tests, nor for eight seeded requests on a distilgpt2-sized model). int8 models are the
exception: their layers quantise each step's activations with one scale for the whole batch, so
a row's scores move slightly with its neighbours.

The model code only runs prefill and decode steps; the threads meet in `GenerationHandle`
(scheduler -> event loop) and in the scheduler's condition variable (event loop -> scheduler).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import types
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from distillery.allocator import return_freed_memory
from distillery.generation.config import GenerationConfig
from distillery.generation.engine import compile_with_frozen_weights, prefill
from distillery.generation.sampling import process_logits
from distillery.models.common import DistilleryError
from distillery.serve.errors import ServeError
from distillery.serve.served_models import ServedModel

logger = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1  # TGI reports seeds as u64; this keeps them inside a torch seed's range


# ----------------------------------------------------------------------------------------------
# The internal request and the events that answer it


@dataclass
class GenerationRequest:
    """What every dialect's generation request becomes.

    `config` holds max_new_tokens and the sampling settings (its eos_token_id ends the row);
    `stop` strings end it too (the text is not cut here: TGI keeps the stop string, OpenAI cuts it);
    `top_n` asks for that many most likely alternatives with each token; `prompt_logprobs` for the
    log-probability of each prompt token given the ones before it.
    """

    prompt_ids: list[int]
    config: GenerationConfig
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_n: int = 0
    prompt_logprobs: bool = False
    timeout: float | None = None  # seconds from submission


@dataclass
class PrefillEvent:
    """The prompt's tokens with their log-probabilities (None for the first)."""

    tokens: list[tuple[int, float | None]]


@dataclass
class TokenEvent:
    """One generated token. `text` is the new text it completes ("" while a character is
    incomplete), or the token's own string for a special token (`special`). `logprob` is the
    log-softmax of the scores it was chosen from (after the repetition penalty, temperature, top-k
    and top-p, as TGI reports it); `top` the `top_n` best (id, logprob) of those scores."""

    id: int
    text: str
    logprob: float
    special: bool
    top: list[tuple[int, float]] | None = None


@dataclass
class FinishEvent:
    reason: str  # "length", "eos_token" or "stop_sequence" (TGI's names)
    generated_tokens: int
    prompt_tokens: int
    seed: int | None  # the seed sampling used (None for greedy decoding)


@dataclass
class ErrorEvent:
    error: ServeError


Event = PrefillEvent | TokenEvent | FinishEvent | ErrorEvent


class GenerationHandle:
    """The event loop's side of one submitted request: its events in order, and `cancel`.

    Made on the event loop's thread; the scheduler thread calls `deliver`, which hands each event
    over through `call_soon_threadsafe`.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def deliver(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (the server is shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        """The client is gone: the scheduler drops the request at its next step boundary."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to and including its FinishEvent or ErrorEvent."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return


# ----------------------------------------------------------------------------------------------
# The batch cache


IDLE_TRIM_AFTER_S = 0.5  # an idle scheduler returns freed memory after this long without work
# Without that, glibc keeps freed mid-sized blocks, and a server's resident memory stays at its
# busiest level after the load has gone (measured: +77 MB after 1,000 requests).


class BatchCache:
    """Keys and values of a model's running rows, each row at its own length.

    Storage per layer is (rows, H, slots, D), grown as rows and longer requests arrive (up to the
    batch limit and the model's positions). Rows 0..n-1 are in use; a leaving row is replaced by
    the last one (one row's copy), so the running rows stay contiguous.

    It follows the model's cache protocol in its fixed-slot form: with `write_at` set, `update`
    writes each row's one new key and value at that row's slot (`write_at` holds one slot per row)
    and returns every slot up to the step's width; the attention mask says which of them hold
    tokens. `length` is set to the width before the step (the model checks it against its
    positions) and is the caller's to keep.
    """

    def __init__(self, n_layer: int, n_head: int, head_dim: int, max_positions: int, max_rows: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.max_positions, self.max_rows = max_positions, max_rows
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = 0  # rows in use
        self.length = 0
        self.write_at: torch.Tensor | None = None
        self.width = 0  # slots the current step attends over
        self._row_index = torch.arange(0, device=device)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, slots) the storage holds now."""
        return (self.keys[0].size(0), self.keys[0].size(2)) if self.keys else (0, 0)

    @property
    def max_length(self) -> int:
        return self.width

    @property
    def batch_size(self) -> int:
        return self.rows

    def add(self, keys: list[torch.Tensor], values: list[torch.Tensor], filled: int, slots_needed: int) -> int:
        """Put a prefilled request (per layer (1, H, >= filled, D), `filled` slots written) in the next
        free row, making room for `slots_needed` slots; returns the row."""
        rows, slots = self.capacity
        if self.rows == rows or slots_needed > slots:
            self._grow(self.rows + 1, slots_needed)
        row = self.rows
        for layer in range(self.n_layer):
            self.keys[layer][row, :, :filled] = keys[layer][0, :, :filled]
            self.values[layer][row, :, :filled] = values[layer][0, :, :filled]
        self.rows += 1
        return row

    def remove(self, row: int, last_row_length: int) -> None:
        """Free `row`; the last row (holding `last_row_length` slots) moves into it."""
        last = self.rows - 1
        if row != last:
            for store in (*self.keys, *self.values):
                store[row, :, :last_row_length] = store[last, :, :last_row_length]
        self.rows -= 1
        if self.rows == 0:  # idle: give the memory back
            self.keys, self.values = [], []

    def _grow(self, rows_needed: int, slots_needed: int) -> None:
        rows, slots = self.capacity
        new_rows = min(max(rows_needed, 2 * rows, 4), self.max_rows)
        # Slots in steps of 64, so that requests of similar lengths do not regrow the cache.
        new_slots = min(max(slots, -(-slots_needed // 64) * 64), self.max_positions)
        assert new_rows >= rows_needed and new_slots >= slots_needed, (rows_needed, slots_needed)
        shape = (new_rows, self.n_head, new_slots, self.head_dim)
        fresh_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        fresh_values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        for old, new in zip((*self.keys, *self.values), (*fresh_keys, *fresh_values)):
            new[: self.rows, :, :slots] = old[: self.rows]
        self.keys, self.values = fresh_keys, fresh_values

    def begin_step(self, write_at: torch.Tensor, width: int) -> None:
        """Set up a decode step: row i writes slot write_at[i]; attention spans slots [0, width)."""
        self.write_at = write_at
        self.width = width
        self.length = width - 1  # the model checks length + 1 against its positions
        if self._row_index.numel() != self.rows:
            self._row_index = torch.arange(self.rows, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the (n, H, 1, D) new keys and values, row i at slot write_at[i]; return the
        (n, H, width, D) keys and values the step attends over."""
        keys, values = self.keys[layer], self.values[layer]
        keys[self._row_index, :, self.write_at] = k[:, :, 0]
        values[self._row_index, :, self.write_at] = v[:, :, 0]
        return keys[: self.rows, :, : self.width], values[: self.rows, :, : self.width]


def batch_decode_step(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, cache: BatchCache) -> torch.Tensor:
    """One token per running row (n,), at its own position (n, 1), attending over the slots `mask`
    (n, width) marks; returns (n, V) float32 next-token logits."""
    out = model(tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)
    return out.logits[:, -1].float()


def compiled_batch_decode_step(model: torch.nn.Module) -> Callable:
    """`batch_decode_step` through torch.compile for `model`, made once and kept on the model (its
    own copy of the code, so that each model has its own compiled graphs; see
    `engine.compiled_decode_step`)."""
    kept = model.__dict__.get("_compiled_batch_decode_step")
    if kept is None:
        own_copy = types.FunctionType(batch_decode_step.__code__.replace(), batch_decode_step.__globals__,
                                      batch_decode_step.__name__)
        kept = model.__dict__["_compiled_batch_decode_step"] = compile_with_frozen_weights(own_copy, model.device)
    return kept


# ----------------------------------------------------------------------------------------------
# Rows and the scheduler


@dataclass
class Row:
    """A request in flight: its settings, random generator and where it stands."""

    served: ServedModel
    request: GenerationRequest
    handle: GenerationHandle
    submitted: float
    deadline: float | None
    seed: int | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (1, V + 1) tokens present so far, for the repetition penalty
    decoder: Any = None
    text: str = ""  # generated text so far (special tokens left out), for stop strings
    generated: int = 0
    length: int = 0  # slots this row holds in the batch cache
    pending: int = 0  # the last token chosen, fed at the next step
    first_token_at: float | None = None

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)


@dataclass
class RunningBatch:
    cache: BatchCache
    rows: list[Row] = field(default_factory=list)


class Scheduler:
    """Owns the waiting queue and the running batches; runs every model step on its own thread."""

    def __init__(self, max_batch_size: int = 32, metrics: Any = None) -> None:
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self._wake = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._batches: dict[str, RunningBatch] = {}
        self._closed = False
        # Called after every decode step with (model name, rows in the step); tests watch joins with it.
        self.step_observer: Callable[[str, int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="distillery-scheduler", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------

    def submit(self, served: ServedModel, request: GenerationRequest, handle: GenerationHandle) -> None:
        now = time.monotonic()
        row = Row(served, request, handle, submitted=now,
                  deadline=now + request.timeout if request.timeout is not None else None)
        with self._wake:
            if self._closed:
                raise ServeError("overloaded", "The server is shutting down; retry on another.")
            self._waiting.append(row)
            self._wake.notify()

    def run_job(self, job: Callable[[], Any]) -> Future:
        """Run `job` (an encoder forward pass) on the scheduler thread between two steps."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise ServeError("overloaded", "The server is shutting down; retry on another.")
            self._jobs.append((job, future))
            self._wake.notify()
        return future

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    def batch_sizes(self) -> dict[str, int]:
        return {name: len(batch.rows) for name, batch in list(self._batches.items())}

    def running_rows(self) -> int:
        return sum(self.batch_sizes().values())

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        trimmed = True
        while True:
            with self._wake:
                while not (self._closed or self._jobs or self._waiting or self.running_rows()):
                    if trimmed:
                        self._wake.wait()
                    elif not self._wake.wait(timeout=IDLE_TRIM_AFTER_S):  # idle for a while: once
                        self._wake.release()  # a request arriving meanwhile need not wait for the trim
                        try:
                            return_freed_memory()
                        finally:
                            self._wake.acquire()
                        trimmed = True
                trimmed = False
                if self._closed:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for job, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(job())
                    except Exception as e:  # noqa: BLE001 - handed to the waiting request
                        future.set_exception(e)
            try:
                with torch.inference_mode():
                    self._admit()
                    for name in list(self._batches):
                        self._step(name)
            except Exception as e:  # noqa: BLE001 - a bug here must not leave requests waiting forever
                logger.exception("the scheduler failed; failing the requests in flight")
                self._fail_all(_generation_error(e))
        self._fail_all(ServeError("overloaded", "The server shut down before this request finished."))

    def _admit(self) -> None:
        """Prefill the waiting requests that fit in their model's batch (at a step boundary)."""
        with self._wake:
            waiting = list(self._waiting)
        for row in waiting:
            batch = self._batches.get(row.served.name)
            speculative = row.served.draft is not None
            if speculative and batch is not None and batch.rows:
                continue  # speculative decoding serves one request at a time
            if batch is not None and len(batch.rows) >= self.max_batch_size:
                continue
            with self._wake:
                self._waiting.remove(row)
            if self._drop_if_gone(row):
                continue
            try:
                if speculative:
                    self._generate_speculatively(row)
                else:
                    self._prefill(row)
            except Exception as e:  # noqa: BLE001 - one request failed, the server goes on
                self._fail(row, _generation_error(e))

    def _drop_if_gone(self, row: Row) -> bool:
        """True (and the row is done with) when its client left or its time ran out."""
        if row.handle.cancelled.is_set():
            self._count_failure(row, "cancelled")
            return True
        if row.deadline is not None and time.monotonic() > row.deadline:
            self._fail(row, ServeError("timeout", f"The request ran past the server's time limit of "
                                                  f"{row.request.timeout:g} s; ask for fewer tokens."))
            return True
        return False

    def _start(self, row: Row) -> None:
        """Per-request state: the random generator, the seen-token mask, the text decoder."""
        served, config = row.served, row.request.config
        device = served.model.device
        if not config.greedy:
            row.seed = row.request.seed if row.request.seed is not None else random.randrange(MAX_SEED)
            row.generator = torch.Generator(device=device).manual_seed(row.seed)
        if config.repetition_penalty != 1.0:
            vocab = served.model.config.vocab_size
            row.seen = torch.zeros(1, vocab + 1, dtype=torch.bool, device=device)
            ids = torch.tensor(row.request.prompt_ids, device=device).clamp(max=vocab)
            row.seen[0, ids] = True
        row.decoder = served.tokenizer.incremental_decoder(skip_special_tokens=True)
        if self.metrics is not None:
            self.metrics.observe_queue(served.name, time.monotonic() - row.submitted, row.prompt_length)

    def _prefill(self, row: Row) -> None:
        served, request = row.served, row.request
        model = served.model
        self._start(row)
        ids = torch.tensor([request.prompt_ids], device=model.device)
        if request.prompt_logprobs:
            row.handle.deliver(PrefillEvent(prompt_logprobs(model, ids)))
        if request.config.max_new_tokens == 0:
            self._finish(row, "length")
            return
        single = model.new_cache(1, ids.size(1))
        logits = prefill(model, ids, None, single)
        if self._choose_and_emit(row, logits):
            return
        row.length = ids.size(1)
        batch = self._batches.get(served.name)
        if batch is None:
            config = model.config
            batch = self._batches[served.name] = RunningBatch(BatchCache(
                config.n_layer, config.n_head, config.n_embd // config.n_head, config.n_positions,
                self.max_batch_size, single.keys[0].dtype, model.device))
        # The last token is never fed back, so a row needs prompt + max_new_tokens - 1 slots.
        slots = row.length + request.config.max_new_tokens - 1
        batch.cache.add(single.keys, single.values, row.length, slots)
        batch.rows.append(row)

    def _step(self, name: str) -> None:
        """One decode step over the model's running rows, after dropping those that are gone."""
        batch = self._batches[name]
        for i in reversed(range(len(batch.rows))):
            if self._drop_if_gone(batch.rows[i]):
                self._remove(batch, i)
        if not batch.rows:
            return
        rows = batch.rows
        served = rows[0].served
        model = served.model
        device = model.device
        lengths = torch.tensor([r.length for r in rows], device=device)
        width = max(r.length for r in rows) + 1
        mask = torch.arange(width, device=device)[None, :] <= lengths[:, None]  # (n, width)
        tokens = torch.tensor([r.pending for r in rows], device=device)
        batch.cache.begin_step(lengths, width)
        step = compiled_batch_decode_step(model) if served.compile else batch_decode_step
        try:
            logits = step(model, tokens, lengths[:, None], mask, batch.cache)
        except Exception as e:  # noqa: BLE001 - the step failed for every row in it
            error = _generation_error(e)
            for row in rows:
                self._fail(row, error)
            del self._batches[name]
            return
        if self.step_observer is not None:
            self.step_observer(name, len(rows))
        if self.metrics is not None:
            self.metrics.observe_step(name, len(rows))
        finished = []
        for i, row in enumerate(rows):
            row.length += 1
            try:
                done = self._choose_and_emit(row, logits[i : i + 1])
            except Exception as e:  # noqa: BLE001 - this row failed; the others go on
                self._fail(row, _generation_error(e))
                done = True
            if done:
                finished.append(i)
        for i in reversed(finished):
            self._remove(batch, i)

    def _remove(self, batch: RunningBatch, i: int) -> None:
        last = batch.rows[-1]
        batch.cache.remove(i, last.length)
        batch.rows[i] = last
        batch.rows.pop()

    # -- choosing tokens ------------------------------------------------------------------------

    def _choose_and_emit(self, row: Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token from (1, V) logits with its own settings; True when it finished."""
        config = row.request.config
        scores = process_logits(logits, row.seen[:, :-1] if row.seen is not None else None, config)
        if config.greedy:
            token = int(scores[0].argmax())
        else:
            # As the engine's sampler, on the row's own generator.
            token = int(torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=row.generator))
        return self._emit(row, token, scores[0])

    def _emit(self, row: Row, token: int, scores: torch.Tensor) -> bool:
        """Hand `token` (chosen from (V,) `scores`) to the client; True when the row finished."""
        request, tokenizer = row.request, row.served.tokenizer
        logprob = float(scores[token] - torch.logsumexp(scores, dim=-1))
        top = None
        if request.top_n:
            best = scores.log_softmax(dim=-1).topk(min(request.top_n, scores.numel()))
            top = [(int(i), float(v)) for v, i in zip(best.values, best.indices) if v > float("-inf")]
        special = token in row.served.special_ids
        text = tokenizer.decode([token]) if special else row.decoder.add(token)
        row.generated += 1
        row.pending = token
        if row.first_token_at is None:
            row.first_token_at = time.monotonic()
        if row.seen is not None:
            row.seen[0, min(token, row.seen.size(1) - 1)] = True
        reason = None
        if token in request.config.eos_token_ids:
            reason = "eos_token"
        elif not special and request.stop:
            before = len(row.text)
            row.text += text
            start = max(0, before - max(len(s) for s in request.stop) + 1)
            if any(s in row.text[start:] for s in request.stop):
                reason = "stop_sequence"
        if reason is None and row.generated >= request.config.max_new_tokens:
            reason = "length"
        if reason is not None and not special:
            text += row.decoder.flush()  # a character left incomplete at the end, as decode() shows it
        row.handle.deliver(TokenEvent(token, text, logprob, special, top))
        if reason is not None:
            self._finish(row, reason)
        return reason is not None

    def _generate_speculatively(self, row: Row) -> None:
        """A model with a draft: the whole request by speculative decoding (batch 1), then its
        tokens are handed over with their log-probabilities from one pass of the target."""
        from distillery.generation.speculative import speculative_generate

        served, request = row.served, row.request
        config, model = request.config, served.model
        self._start(row)
        ids = torch.tensor([request.prompt_ids], device=model.device)
        if request.prompt_logprobs:
            row.handle.deliver(PrefillEvent(prompt_logprobs(model, ids)))
        if config.max_new_tokens == 0:
            self._finish(row, "length")
            return
        eos = config.eos_token_ids
        tokens, _ = speculative_generate(
            model, served.draft, ids, config.max_new_tokens, k=served.draft_k, do_sample=not config.greedy,
            temperature=config.temperature or 1.0, top_k=config.top_k or 0, top_p=config.top_p,
            generator=row.generator, eos_token_id=eos[0] if eos else None)
        generated = tokens[0, ids.size(1):].tolist()
        logits = model(tokens[:, :-1], logits_to_keep=len(generated)).logits[0].float()
        for i, token in enumerate(generated):
            if self._emit(row, token, process_logits(logits[i : i + 1], None, config)[0]):
                return
        self._finish(row, "length")  # only when speculative_generate stopped short (it does not)

    # -- endings --------------------------------------------------------------------------------

    def _finish(self, row: Row, reason: str) -> None:
        row.handle.deliver(FinishEvent(reason, row.generated, row.prompt_length, row.seed))
        if self.metrics is not None:
            now = time.monotonic()
            first = row.first_token_at
            self.metrics.observe_generation(
                row.served.name, ttft=None if first is None else first - row.submitted,
                per_token=(now - first) / (row.generated - 1) if first is not None and row.generated > 1 else None,
                generated=row.generated)

    def _fail(self, row: Row, error: ServeError) -> None:
        row.handle.deliver(ErrorEvent(error))
        self._count_failure(row, error.kind)

    def _count_failure(self, row: Row, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_failure(reason)

    def _fail_all(self, error: ServeError) -> None:
        for batch in self._batches.values():
            for row in batch.rows:
                self._fail(row, error)
        self._batches.clear()
        with self._wake:
            waiting, jobs = list(self._waiting), list(self._jobs)
            self._waiting.clear()
            self._jobs.clear()
        for row in waiting:
            self._fail(row, error)
        for _, future in jobs:
            if not future.done():
                future.set_exception(error)


def prompt_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[int, float | None]]:
    """(id, log p(token | tokens before it)) for each prompt token of (1, T) `ids`, from the raw
    logits (None for the first token, which has nothing before it)."""
    logits = model(ids, logits_to_keep=0).logits[0].float()  # (T, V)
    logprobs = logits[:-1].log_softmax(dim=-1).gather(1, ids[0, 1:, None])[:, 0].tolist()
    tokens = ids[0].tolist()
    return [(tokens[0], None)] + list(zip(tokens[1:], logprobs))


def _generation_error(error: Exception) -> ServeError:
    if isinstance(error, ServeError):
        return error
    if isinstance(error, DistilleryError):
        return ServeError("generation", str(error))
    logger.exception("generation failed", exc_info=error)
    return ServeError("generation", f"Generation failed ({type(error).__name__}: {error}).")
