"""What every route shares: the served models, the settings, the scheduler, the metrics, the
bound on requests in flight, and the plumbing between a request and its scheduler events.

The dialect modules (`tgi`, `hf_api`, `openai_api`) validate their bodies into a
`GenerationRequest` and use `Server` to run it; nothing here knows a dialect's field names
beyond what the caller passes in for its error messages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from distillery.models.common import DistilleryError
from distillery.serve.errors import ServeError
from distillery.serve.metrics import Metrics
from distillery.serve.scheduler import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationHandle,
    GenerationRequest,
    PrefillEvent,
    Scheduler,
    TokenEvent,
)
from distillery.serve.served_models import ModelRegistry, ServedModel


@dataclass
class ServeSettings:
    """The server's limits and switches; `distillery serve` fills them from its flags.

    `max_input_tokens` / `max_total_tokens` default to each model's positions (minus one for the
    input, so that at least one token can be generated).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_concurrent_requests: int = 128
    max_batch_size: int = 32
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int = 4
    max_body_bytes: int = 2_000_000
    request_timeout: float = 300.0
    # TGI's default when a request does not say max_new_tokens (capped by the room left).
    default_max_new_tokens: int = 100


class Slot:
    """One of the `max_concurrent_requests` places, held from validation to the last byte sent."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._server.in_flight -= 1


class Server:
    def __init__(self, registry: ModelRegistry, settings: ServeSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler = Scheduler(settings.max_batch_size, self.metrics)
        self.in_flight = 0  # only touched on the event loop's thread
        self.metrics.gauges["distillery_queue_size"] = (
            "Generation requests waiting for their prefill.", lambda: {(): self.scheduler.queue_size})
        self.metrics.gauges["distillery_batch_current_size"] = (
            "Rows in each model's running batch.",
            lambda: {(("model", name),): n for name, n in self.scheduler.batch_sizes().items()})
        self.metrics.gauges["distillery_requests_in_flight"] = (
            "Requests being answered (at most max_concurrent_requests).", lambda: {(): self.in_flight})

    def close(self) -> None:
        self.scheduler.close()

    # -- admission and limits -------------------------------------------------------------------

    def admit(self) -> Slot:
        """A place for one more request, or 429 at once when all are taken."""
        limit = self.settings.max_concurrent_requests
        if self.in_flight >= limit:
            raise ServeError("overloaded", f"Model is overloaded: {limit} requests are already in flight "
                                           "(--max-concurrent-requests); retry later.")
        self.in_flight += 1
        return Slot(self)

    def limits(self, served: ServedModel) -> tuple[int, int]:
        """(max input tokens, max input + generated tokens) for `served`."""
        positions = served.max_positions
        total = min(self.settings.max_total_tokens or positions, positions)
        return min(self.settings.max_input_tokens or total - 1, total - 1), total

    def check_lengths(self, served: ServedModel, input_tokens: int, new_tokens: int,
                      input_name: str = "inputs", new_name: str = "max_new_tokens") -> None:
        """422/400 with the numbers when the prompt, or the prompt with the new tokens, is too long."""
        max_input, max_total = self.limits(served)
        if input_tokens > max_input:
            raise ServeError("validation", f"`{input_name}` must have at most {max_input} tokens for "
                                           f"{served.name}. Given: {input_tokens}.", param=input_name)
        if input_tokens + new_tokens > max_total:
            raise ServeError("validation", f"`{input_name}` tokens + `{new_name}` must be <= {max_total} for "
                                           f"{served.name}. Given: {input_tokens} `{input_name}` tokens and "
                                           f"{new_tokens} `{new_name}`.", param=new_name)

    def check_stops(self, stops: list[str], param: str) -> list[str]:
        if len(stops) > self.settings.max_stop_sequences:
            raise ServeError("validation", f"`{param}` supports up to {self.settings.max_stop_sequences} stop "
                                           f"sequences. Given: {len(stops)}.", param=param)
        if any(not s for s in stops):
            raise ServeError("validation", f"`{param}` holds an empty string; every stop sequence needs text.",
                             param=param)
        return stops

    # -- prompts --------------------------------------------------------------------------------

    @staticmethod
    def encode_prompt(served: ServedModel, text: str, param: str, empty_starts_from_bos: bool = True,
                      truncate: int | None = None) -> list[int]:
        """Token ids of a prompt; an empty one starts from the BOS token (as the pipeline does) or
        is refused; `truncate` keeps its last tokens."""
        try:
            ids = served.tokenizer.encode(text)
        except DistilleryError as e:
            raise ServeError("validation", f"`{param}`: {e}", param=param) from None
        if not ids:
            bos = served.tokenizer.bos_token_id
            if not empty_starts_from_bos or bos is None:
                raise ServeError("validation", f"`{param}` cannot be empty.", param=param)
            ids = [bos]
        return ids[-truncate:] if truncate else ids

    @staticmethod
    def eos_token_ids(served: ServedModel) -> list[int]:
        """The ids that end a generation: the checkpoint's, else the tokenizer's EOS."""
        return served.runner.generation_config().eos_token_ids

    # -- running requests -----------------------------------------------------------------------

    def submit(self, served: ServedModel, request: GenerationRequest) -> GenerationHandle:
        """Queue `request` for `served`; its events come through the returned handle."""
        if request.timeout is None:
            request.timeout = self.settings.request_timeout
        handle = GenerationHandle()
        self.scheduler.submit(served, request, handle)
        return handle

    def start(self, served: ServedModel, requests: list[GenerationRequest]) -> tuple[Slot, list[GenerationHandle]]:
        """Admit one request and queue its generations; the slot is released if queueing fails."""
        slot = self.admit()
        try:
            return slot, [self.submit(served, r) for r in requests]
        except BaseException:
            slot.release()
            raise

    async def run_encoder(self, job: Callable[[], Any]) -> Any:
        """Run an encoder pass (fill-mask, features) on the scheduler thread; a user's mistake the
        pipeline finds (no mask token, a text too long) becomes a validation error."""
        future = self.scheduler.run_job(job)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout)
        except TimeoutError:
            raise ServeError("timeout", f"The request ran past the server's time limit of "
                                        f"{self.settings.request_timeout:g} s.") from None
        except ServeError:
            raise
        except DistilleryError as e:
            raise ServeError("validation", str(e)) from None
        except Exception as e:  # noqa: BLE001 - reported to the client as a failed request
            raise ServeError("generation", f"The model failed on this input ({type(e).__name__}: {e}).") from e


async def watch_disconnect(request: Request, handles: list[GenerationHandle]) -> None:
    """Cancel `handles` when the client goes away (the body has been read, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for handle in handles:
                handle.cancel()
            return


async def collect(handle: GenerationHandle) -> Generation:
    """Wait for a whole generation; its ErrorEvent is raised as a ServeError."""
    generation = Generation()
    async for event in handle.events():
        generation.add(event)
    return generation


async def run_to_end(request: Request, slot: Slot, handles: list[GenerationHandle]) -> list[Generation]:
    """Every handle's whole generation, in order; cancels them all if the client leaves or one fails."""
    watcher = asyncio.create_task(watch_disconnect(request, handles))
    tasks = [asyncio.create_task(collect(h)) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        watcher.cancel()
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.cancel()  # a no-op for finished ones; stops the others after a failure
        slot.release()


async def merged_events(handles: list[GenerationHandle]) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) from several handles as they arrive, until each has finished."""
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def forward(i: int, handle: GenerationHandle) -> None:
        async for event in handle.events():
            await queue.put((i, event))
        await queue.put((i, None))

    tasks = [asyncio.create_task(forward(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def guarded_stream(request: Request, slot: Slot, handles: list[GenerationHandle],
                         chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A response body that cancels the generations when the client leaves (or the body ends
    early) and gives the request's slot back at its end."""
    watcher = asyncio.create_task(watch_disconnect(request, handles))
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()
        slot.release()


def sse(payload: Any) -> bytes:
    """One server-sent event carrying `payload` as JSON (or a literal string such as [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n".encode()


class Generation:
    """A whole generation gathered from its events: tokens, text, prompt log-probabilities, ending."""

    def __init__(self) -> None:
        self.tokens: list[TokenEvent] = []
        self.prefill: list[tuple[int, float | None]] = []
        self.finish: FinishEvent | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, ErrorEvent):
            raise event.error
        if isinstance(event, TokenEvent):
            self.tokens.append(event)
        elif isinstance(event, PrefillEvent):
            self.prefill = event.tokens
        elif isinstance(event, FinishEvent):
            self.finish = event

    @property
    def text(self) -> str:
        """The generated text, special tokens left out (what decode(skip_special_tokens=True) gives)."""
        return "".join(t.text for t in self.tokens if not t.special)
