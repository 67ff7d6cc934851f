"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models.

Bodies and answers have OpenAI's field names, so the `openai` package works unchanged when its
`base_url` points here. Completions take `prompt` (a string, a list of them, or token ids),
`max_tokens` (16 by default), `temperature`, `top_p`, `n`, `stop` (up to 4), `stream` with
`stream_options.include_usage`, `logprobs` (0-5 alternatives), `echo`, `seed`, and two additions
OpenAI lacks: `top_k` and `repetition_penalty`. Streams are `data: {...}` chunks ending with
`data: [DONE]`. The returned text stops before a stop string, as OpenAI's does. Choice i of a
seeded request samples with seed + i. Errors are `{"error": {"message", "type", "param", "code"}}`.

Chat needs the model's chat template (tokenizer_config.json's `chat_template`); a model without
one gets a 400 that says so. /v1/embeddings answers for encoders (see `embed`), not for causal
language models. /v1/models lists every served model with its `task`, `mask_token` and
`max_positions` besides OpenAI's fields.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distillery.generation.config import GenerationConfig
from distillery.pipelines.text_generation import cut_at_stop, stop_prefix_length
from distillery.serve.errors import ServeError, parse_body
from distillery.serve.scheduler import ErrorEvent, FinishEvent, GenerationRequest, PrefillEvent, TokenEvent
from distillery.serve.served_models import ServedModel
from distillery.serve.server import Server, Slot, guarded_stream, merged_events, run_to_end, sse

router = APIRouter(prefix="/v1")

MAX_CHOICES = 128  # prompts x n in one request (OpenAI's limit on n)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    top_k: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM and llama.cpp take it too
    repetition_penalty: float | None = Field(None, gt=0)  # likewise
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# ----------------------------------------------------------------------------------------------
# Models


@router.get("/models")
async def models_route(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    return {"object": "list", "data": [_model_card(served) for served in server.registry.all()]}


@router.get("/models/{name:path}")
async def model_route(name: str, request: Request) -> dict[str, Any]:
    return _model_card(request.app.state.server.registry.get(name))


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "distillery",
            **{k: v for k, v in served.describe().items() if k != "name"}}


# ----------------------------------------------------------------------------------------------
# Completions


@router.post("/completions")
async def completions_route(request: Request) -> Any:
    server: Server = request.app.state.server
    body = parse_body(await request.body(), CompletionRequest)
    served = _text_model(server, body.model)
    for name, unsupported in (("best_of", body.best_of not in (None, 1)), ("suffix", body.suffix is not None)):
        if unsupported:
            raise ServeError("validation", f"`{name}` is not supported by this server; leave it out.", param=name)
    prompts = _prompts(server, served, body.prompt)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    requests = _requests(server, served, body, prompts, max_tokens, top_n=body.logprobs or 0,
                         prompt_logprobs=body.echo and body.logprobs is not None)
    reply = Reply("cmpl", served.name, "text_completion")
    slot, handles = server.start(served, requests)
    if body.stream:
        chunks = _completion_chunks(reply, server, served, body, prompts, handles)
        return _event_stream(request, slot, handles, chunks)
    generations = await run_to_end(request, slot, handles)
    stops = _stops(body.stop)
    choices = []
    for index, generation in enumerate(generations):
        prompt_text, prompt_ids = prompts[index // body.n]
        completion = cut_at_stop(generation.text, stops)
        text = (prompt_text if body.echo else "") + completion
        logprobs = None
        if body.logprobs is not None:
            entries = (_prompt_entries(generation.prefill) if body.echo else []) + _token_entries(generation.tokens)
            logprobs = _legacy_logprobs(served, entries, len(text))
        choices.append({"text": text, "index": index, "logprobs": logprobs,
                        "finish_reason": _finish_reason(generation.finish.reason, generation.text, completion)})
    return reply.body(choices=choices, usage=_usage(prompts, generations))


async def _completion_chunks(reply: Reply, server: Server, served: ServedModel, body: CompletionRequest,
                             prompts: list[tuple[str, list[int]]], handles: list) -> AsyncIterator[bytes]:
    stops = _stops(body.stop)
    streams = [ChoiceText(stops) for _ in handles]
    usage = (body.stream_options or StreamOptions()).include_usage
    extra = {"usage": None} if usage else {}
    want_logprobs = body.logprobs is not None
    if body.echo and not want_logprobs:
        for index in range(len(handles)):
            yield sse(reply.body([_completion_choice(index, prompts[index // body.n][0])], **extra))
    generated = [0] * len(handles)
    async for index, event in merged_events(handles):
        if isinstance(event, ErrorEvent):
            server.metrics.count_failure(event.error.kind)
            yield sse(event.error.body("openai"))
            return
        stream = streams[index]
        if isinstance(event, PrefillEvent):  # echo with logprobs: the prompt, token by token
            text = prompts[index // body.n][0]
            logprobs = _legacy_logprobs(served, _prompt_entries(event.tokens), len(text))
            yield sse(reply.body([_completion_choice(index, text, logprobs)], **extra))
        elif isinstance(event, TokenEvent):
            generated[index] += 1
            released = stream.add(event)
            if released or want_logprobs:
                logprobs = None
                if want_logprobs:
                    logprobs = _legacy_logprobs(served, _token_entries([event]), None, stream.offset)
                    stream.offset += len(released)
                yield sse(reply.body([_completion_choice(index, released, logprobs)], **extra))
        elif isinstance(event, FinishEvent):
            rest = stream.finish()
            yield sse(reply.body([_completion_choice(index, rest, None, stream.finish_reason(event.reason))],
                                 **extra))
    if usage:
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        yield sse(reply.body([], usage=_usage_numbers(prompt_tokens, sum(generated))))
    yield sse("[DONE]")


def _completion_choice(index: int, text: str, logprobs: Any = None, finish_reason: str | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


# ----------------------------------------------------------------------------------------------
# Chat


@router.post("/chat/completions")
async def chat_route(request: Request) -> Any:
    server: Server = request.app.state.server
    body = parse_body(await request.body(), ChatRequest)
    served = _text_model(server, body.model)
    if served.chat_template is None:
        raise ServeError("validation", f"Model {served.name} has no chat template, so its chat messages cannot be "
                                       "turned into a prompt; use /v1/completions with a prompt instead.",
                         param="model", code="no_chat_template")
    prompt_text = render_chat(served, [m.model_dump() for m in body.messages])
    ids = server.encode_prompt(served, prompt_text, "messages")
    prompts = [(prompt_text, ids)]
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = limit if limit is not None else server.limits(served)[1] - len(ids)
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    requests = _requests(server, served, body, prompts, max_tokens, top_n=top_n, prompt_logprobs=False,
                         length_name="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    reply = Reply("chatcmpl", served.name, "chat.completion")
    slot, handles = server.start(served, requests)
    if body.stream:
        return _event_stream(request, slot, handles, _chat_chunks(reply, server, served, body, ids, handles))
    generations = await run_to_end(request, slot, handles)
    stops = _stops(body.stop)
    choices = []
    for index, generation in enumerate(generations):
        content = cut_at_stop(generation.text, stops)
        logprobs = _chat_logprobs(served, generation.tokens) if body.logprobs else None
        choices.append({"index": index, "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": _finish_reason(generation.finish.reason, generation.text, content)})
    return reply.body(choices=choices, usage=_usage(prompts, generations))


async def _chat_chunks(reply: Reply, server: Server, served: ServedModel, body: ChatRequest, ids: list[int],
                       handles: list) -> AsyncIterator[bytes]:
    stops = _stops(body.stop)
    streams = [ChoiceText(stops) for _ in handles]
    usage = (body.stream_options or StreamOptions()).include_usage
    extra = {"usage": None} if usage else {}
    reply.object = "chat.completion.chunk"
    for index in range(len(handles)):
        yield sse(reply.body([_chat_choice(index, {"role": "assistant", "content": ""})], **extra))
    generated = 0
    async for index, event in merged_events(handles):
        if isinstance(event, ErrorEvent):
            server.metrics.count_failure(event.error.kind)
            yield sse(event.error.body("openai"))
            return
        if isinstance(event, TokenEvent):
            generated += 1
            released = streams[index].add(event)
            if released or body.logprobs:
                logprobs = _chat_logprobs(served, [event]) if body.logprobs else None
                yield sse(reply.body([_chat_choice(index, {"content": released}, logprobs)], **extra))
        elif isinstance(event, FinishEvent):
            rest = streams[index].finish()
            if rest:
                yield sse(reply.body([_chat_choice(index, {"content": rest})], **extra))
            yield sse(reply.body([_chat_choice(index, {}, None, streams[index].finish_reason(event.reason))],
                                 **extra))
    if usage:
        yield sse(reply.body([], usage=_usage_numbers(len(ids), generated)))
    yield sse("[DONE]")


def _chat_choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def render_chat(served: ServedModel, messages: list[dict[str, Any]]) -> str:
    """The prompt the model's chat template makes of `messages` (rendered in jinja2's sandbox, with
    the variables transformers' apply_chat_template gives it)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for message in messages:  # OpenAI's content parts: keep the text ones
        if isinstance(message.get("content"), list):
            message["content"] = "".join(p.get("text", "") for p in message["content"] if p.get("type") == "text")

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    tokenizer = served.tokenizer
    try:
        return environment.from_string(served.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "")
    except TemplateError as e:
        raise ServeError("validation", f"Model {served.name}'s chat template refused these messages ({e}).",
                         param="messages") from None


# ----------------------------------------------------------------------------------------------
# Embeddings


@router.post("/embeddings")
async def embeddings_route(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    body = parse_body(await request.body(), EmbeddingRequest)
    served = server.registry.get(body.model)
    if served.task == "text-generation":
        raise ServeError("validation", f"Model {served.name} is a causal language model (text-generation); "
                                       "embeddings need an encoder: name a fill-mask or feature-extraction model.",
                         param="model")
    texts = _embedding_texts(served, body.input)
    limit = served.max_positions
    lengths = [len(served.tokenizer.encode(text)) for text in texts]
    for i, n in enumerate(lengths):
        if n > limit:
            raise ServeError("validation", f"`input[{i}]` is {n} tokens long but {served.name} takes at most "
                                           f"{limit}; shorten it.", param="input")
    slot = server.admit()
    try:
        vectors = await server.run_encoder(lambda: embed(served, texts))
    finally:
        slot.release()
    tokens = sum(lengths)
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise ServeError("validation", f"`dimensions` must be {vectors.shape[1]} for {served.name} (its embeddings "
                                       "cannot be shortened).", param="dimensions")
    data = []
    for i, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": served.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def embed(served: ServedModel, texts: list[str]) -> np.ndarray:
    """(N, D) float32 embeddings of `texts`.

    A sentence-transformers model gives its own (pooled, maybe normalised) embeddings; any other
    encoder the mean of its last hidden state over the text's tokens (special tokens included, as
    sentence-transformers' mean pooling counts them). This is the one place to change how a model
    without a pooling config is pooled.
    """
    if served.sentence_encoder:
        return np.asarray(served.runner.encode(texts), dtype=np.float32)
    from distillery.pipelines.feature_extraction import FeatureExtractionPipeline

    extractor = FeatureExtractionPipeline(served.model, served.tokenizer)
    features = extractor(texts, return_tensors=True)
    return torch.stack([f[0].mean(dim=0) for f in features]).numpy().astype(np.float32)


def _embedding_texts(served: ServedModel, given: Any) -> list[str]:
    if isinstance(given, str):
        return [given]
    if not given:
        raise ServeError("validation", "`input` is an empty list; send a text or a list of texts.", param="input")
    if all(isinstance(x, str) for x in given):
        return list(given)
    rows = [given] if isinstance(given[0], int) else given
    vocab = served.tokenizer.vocab_size
    for row in rows:
        if not row or any(not 0 <= t < vocab for t in row):
            raise ServeError("validation", f"`input` holds token ids outside 0..{vocab - 1} or an empty list.",
                             param="input")
    return [served.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


# ----------------------------------------------------------------------------------------------
# Shared by completions and chat


class Reply:
    """The envelope every answer and chunk of one request shares (same id and creation time)."""

    def __init__(self, prefix: str, model: str, object_name: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.object = object_name

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}


class ChoiceText:
    """One streamed choice's text: held back while it may be the start of a stop string, cut
    before a stop string, never past it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False
        self.offset = 0  # characters released so far (for the logprobs' text offsets)

    def add(self, token: TokenEvent) -> str:
        """The text this token releases."""
        if self.stopped or token.special:
            return ""
        self.pending += token.text
        cut = cut_at_stop(self.pending, self.stops)
        if len(cut) < len(self.pending):
            self.stopped, self.pending = True, ""
            return cut
        safe = len(self.pending) - stop_prefix_length(self.pending, self.stops)
        released, self.pending = self.pending[:safe], self.pending[safe:]
        return released

    def finish(self) -> str:
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest

    def finish_reason(self, reason: str) -> str:
        return "length" if reason == "length" and not self.stopped else "stop"


def _text_model(server: Server, name: str) -> ServedModel:
    served = server.registry.get(name)
    if served.task != "text-generation":
        raise ServeError("validation", f"`model` names {served.name}, a {served.task} model, which does not "
                                       "generate text; name a text-generation model.", param="model")
    return served


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _prompts(server: Server, served: ServedModel, given: Any) -> list[tuple[str, list[int]]]:
    """(text, ids) of each prompt: strings are encoded, token ids decoded (for echo)."""
    tokenizer = served.tokenizer
    if isinstance(given, str):
        return [(given, server.encode_prompt(served, given, "prompt"))]
    if not given:
        raise ServeError("validation", "`prompt` is an empty list; send a prompt or a list of prompts.",
                         param="prompt")
    if all(isinstance(p, str) for p in given):
        return [(p, server.encode_prompt(served, p, f"prompt[{i}]")) for i, p in enumerate(given)]
    rows = [given] if isinstance(given[0], int) else given
    vocab = served.model.config.vocab_size
    for i, row in enumerate(rows):
        if not row or any(not 0 <= t < vocab for t in row):
            raise ServeError("validation", f"`prompt` row {i} holds token ids outside 0..{vocab - 1} or is empty.",
                             param="prompt")
    return [(tokenizer.decode(row), list(row)) for row in rows]


def _requests(server: Server, served: ServedModel, body: SamplingFields, prompts: list[tuple[str, list[int]]],
              max_tokens: int, top_n: int, prompt_logprobs: bool,
              length_name: str = "max_tokens") -> list[GenerationRequest]:
    """One internal request per choice (prompts x n), each checked against the limits."""
    if len(prompts) * body.n > MAX_CHOICES:
        raise ServeError("validation", f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} "
                                       f"choices; at most {MAX_CHOICES} fit in one request.", param="n")
    for name, value in (("presence_penalty", body.presence_penalty), ("frequency_penalty", body.frequency_penalty)):
        if value not in (None, 0, 0.0):
            raise ServeError("validation", f"`{name}` is not supported by this server; use `repetition_penalty` "
                                           "instead.", param=name)
    if body.logit_bias:
        raise ServeError("validation", "`logit_bias` is not supported by this server; leave it out.",
                         param="logit_bias")
    stops = server.check_stops(_stops(body.stop), "stop")
    if served.draft is not None and body.repetition_penalty not in (None, 1.0):
        raise ServeError("validation", f"{served.name} decodes speculatively, which does not support "
                                       "`repetition_penalty`; leave it out.", param="repetition_penalty")
    temperature = 1.0 if body.temperature is None else body.temperature
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=True, temperature=temperature,
                              top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                              repetition_penalty=body.repetition_penalty or 1.0,
                              eos_token_id=server.eos_token_ids(served))
    requests = []
    for _, ids in prompts:
        server.check_lengths(served, len(ids), max_tokens, "prompt", length_name)
        for choice in range(body.n):
            seed = None if body.seed is None else body.seed + choice
            requests.append(GenerationRequest(ids, config, stop=stops, seed=seed, top_n=top_n,
                                              prompt_logprobs=prompt_logprobs))
    return requests


def _event_stream(request: Request, slot: Slot, handles: list, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(guarded_stream(request, slot, handles, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _finish_reason(reason: str, generated: str, returned: str) -> str:
    """OpenAI's names: "length" when the token limit ended it, "stop" for EOS or a stop string."""
    return "length" if reason == "length" and len(returned) == len(generated) else "stop"


def _usage(prompts: list[tuple[str, list[int]]], generations: list) -> dict[str, int]:
    return _usage_numbers(sum(len(ids) for _, ids in prompts), sum(g.finish.generated_tokens for g in generations))


def _usage_numbers(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# Log-probabilities. An entry is (token id, its text, logprob or None, [(id, logprob)] alternatives or None).


def _prompt_entries(prefill: list[tuple[int, float | None]]) -> list[tuple[int, str | None, float | None, Any]]:
    return [(i, None, lp, None) for i, lp in prefill]


def _token_entries(tokens: list[TokenEvent]) -> list[tuple[int, str | None, float | None, Any]]:
    return [(t.id, "" if t.special else t.text, t.logprob, t.top) for t in tokens]


def _legacy_logprobs(served: ServedModel, entries: list, text_length: int | None, offset: int = 0) -> dict[str, Any]:
    """Completions' logprobs: tokens, token_logprobs, top_logprobs ({token: logprob} with the chosen
    token among them) and text_offset; entries past `text_length` (cut at a stop string) left out."""
    decode = served.tokenizer.decode
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, text, logprob, top in entries:
        if text_length is not None and offset >= text_length and out["tokens"]:
            break
        token = decode([token_id])
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {token: logprob, **{decode([i]): lp for i, lp in top}})
        out["text_offset"].append(offset)
        offset += len(token if text is None else text)
    return out


def _chat_logprobs(served: ServedModel, tokens: list[TokenEvent]) -> dict[str, Any]:
    decode = served.tokenizer.decode

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}
                        for t in tokens]}
