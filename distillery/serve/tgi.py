"""Text Generation Inference's API: /generate, /generate_stream, /tokenize, /info, /health.

Bodies and answers have TGI's field names and shapes (huggingface_hub's `InferenceClient`
parses them): `{"inputs", "parameters", "stream"}` in; `{"generated_text", "details"}` out, with
`details.finish_reason` one of `length`, `eos_token`, `stop_sequence`, and per-token `id`, `text`,
`logprob`, `special`. Streams are server-sent events, one per token, the last carrying
`generated_text` and `details`. Errors are `{"error", "error_type"}`: 422 validation, 424
generation, 429 overloaded.

Where TGI and this server differ: `temperature` 0 means greedy decoding here (TGI refuses it);
a body may name the served model with `"model"` (TGI serves one; here the default is the first
text-generation model); `best_of`, `grammar`, `typical_p`, `frequency_penalty`, `watermark` and
adapters are refused with a 422 that names them. Token log-probabilities are those of the scores
the token was chosen from (after repetition penalty, temperature, top-k and top-p), as TGI's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distillery.generation.config import GenerationConfig
from distillery.serve.errors import ServeError, parse_body
from distillery.serve.scheduler import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent
from distillery.serve.served_models import ServedModel
from distillery.serve.server import Generation, Server, guarded_stream, run_to_end, sse

router = APIRouter()

MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens


class Parameters(BaseModel):
    """TGI's generate parameters (unknown names are refused, so a typo is not silently ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    adapter_id: str | None = None
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    watermark: bool = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False
    model: str | None = None  # which served model (distillery's addition; TGI serves one)
    options: dict[str, Any] | None = None  # the Inference API's options, accepted on POST / and ignored


# The answers' shapes (the routes build them as dicts; the tests check answers against these).


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


class Details(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


# ----------------------------------------------------------------------------------------------
# Routes


@router.post("/generate")
async def generate_route(request: Request) -> JSONResponse:
    body = parse_body(await request.body(), GenerateRequest)
    return await generate(request, body)


@router.post("/generate_stream")
async def generate_stream_route(request: Request) -> StreamingResponse:
    body = parse_body(await request.body(), GenerateRequest)
    return await generate_stream(request, body)


@router.post("/tokenize")
async def tokenize_route(request: Request) -> list[dict[str, Any]]:
    server: Server = request.app.state.server
    body = parse_body(await request.body(), GenerateRequest)
    served = _text_model(server, body.model)
    tokenizer = served.tokenizer
    # The backend's offsets, straight: only pipelines of encoders change the backend's truncation
    # (under the tokenizer's lock), never a text-generation model's tokenizer.
    encoding = tokenizer.backend.encode(body.inputs)
    return [{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
            for i, (start, stop) in zip(encoding.ids, encoding.offsets)]


@router.get("/info")
async def info_route(request: Request) -> dict[str, Any]:
    """TGI's /info for the default model, with every served model under `models` (for the playground)."""
    server: Server = request.app.state.server
    settings = server.settings
    models = server.registry.all()
    first = models[0] if models else None
    max_input, max_total = server.limits(first) if first else (settings.max_input_tokens, settings.max_total_tokens)
    return {
        "model_id": first.name if first else None,
        "model_sha": None,
        "model_dtype": first.dtype if first else None,
        "model_device_type": first.model.device.type if first else None,
        "model_pipeline_tag": first.task if first else None,
        "max_concurrent_requests": settings.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": settings.max_stop_sequences,
        "max_input_tokens": max_input,
        "max_total_tokens": max_total,
        "max_batch_size": settings.max_batch_size,
        "max_client_batch_size": 1,
        "validation_workers": 1,
        "router": "distillery",
        "version": _version(),
        "sha": None,
        "docker_label": None,
        "models": [{**served.describe(), **dict(zip(("max_input_tokens", "max_total_tokens"), server.limits(served)))}
                   for served in models],
        "loading": [name for name in server.registry.loading],
    }


@router.get("/health")
async def health_route(request: Request) -> JSONResponse:
    """200 once every model has loaded; 503 before."""
    registry = request.app.state.server.registry
    if registry.ready:
        return JSONResponse({"status": "ok", "models": registry.order})
    loading = ", ".join(registry.loading)
    return JSONResponse({"error": f"Still loading: {loading}.", "error_type": "unhealthy"}, status_code=503)


# ----------------------------------------------------------------------------------------------
# Generation


async def generate(request: Request, body: GenerateRequest) -> JSONResponse:
    server: Server = request.app.state.server
    served, generation_request = _to_internal(server, body)
    slot, [handle] = server.start(served, [generation_request])
    generation = (await run_to_end(request, slot, [handle]))[0]
    params = body.parameters
    text = generation.text
    if params.return_full_text:
        text = body.inputs + text
    answer: dict[str, Any] = {"generated_text": text}
    if params.details:
        tokenizer = served.tokenizer
        finish = generation.finish
        answer["details"] = {
            "finish_reason": finish.reason,
            "generated_tokens": finish.generated_tokens,
            "seed": finish.seed,
            "prefill": [{"id": i, "text": tokenizer.decode([i]), "logprob": lp} for i, lp in generation.prefill],
            "tokens": [_token(t) for t in generation.tokens],
        }
        if params.top_n_tokens:
            answer["details"]["top_tokens"] = [_top_tokens(served, t) for t in generation.tokens]
    return JSONResponse(answer)


async def generate_stream(request: Request, body: GenerateRequest) -> StreamingResponse:
    server: Server = request.app.state.server
    if body.parameters.decoder_input_details:
        raise ServeError("validation", "`decoder_input_details` == true is not supported when streaming tokens.",
                         param="parameters.decoder_input_details")
    served, generation_request = _to_internal(server, body)
    slot, [handle] = server.start(served, [generation_request])

    async def events() -> AsyncIterator[bytes]:
        text = body.inputs if body.parameters.return_full_text else ""
        index = 0
        last: TokenEvent | None = None
        async for event in handle.events():
            if isinstance(event, ErrorEvent):
                server.metrics.count_failure(event.error.kind)
                yield sse(event.error.body("tgi"))
                return
            if isinstance(event, TokenEvent):
                if last is not None:  # one token behind, so that the last event can carry the ending
                    yield sse(_stream_event(served, body, index, last))
                index += 1
                last = event
                if not event.special:
                    text += event.text
            elif isinstance(event, FinishEvent):
                if last is None:  # nothing generated
                    return
                yield sse(_stream_event(served, body, index, last, text, event))

    return StreamingResponse(guarded_stream(request, slot, [handle], events()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream_event(served: ServedModel, body: GenerateRequest, index: int, token: TokenEvent,
                  generated_text: str | None = None, finish: FinishEvent | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"index": index, "token": _token(token),
                             "top_tokens": _top_tokens(served, token) if body.parameters.top_n_tokens else None,
                             "generated_text": generated_text, "details": None}
    if finish is not None:
        event["details"] = {"finish_reason": finish.reason, "generated_tokens": finish.generated_tokens,
                            "seed": finish.seed, "input_length": finish.prompt_tokens}
    return event


def _token(token: TokenEvent) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def _top_tokens(served: ServedModel, token: TokenEvent) -> list[dict[str, Any]]:
    tokenizer = served.tokenizer
    return [{"id": i, "text": tokenizer.decode([i]), "logprob": lp, "special": i in served.special_ids}
            for i, lp in token.top or []]


def _text_model(server: Server, name: str | None) -> ServedModel:
    served = server.registry.get(name) if name is not None else server.registry.default("text-generation")
    if served.task != "text-generation":
        raise ServeError("validation", f"`model` names {served.name}, a {served.task} model; TGI's routes generate "
                                       f"text, so name a text-generation model (or use /models/{served.name}).",
                         param="model")
    return served


def _to_internal(server: Server, body: GenerateRequest) -> tuple[ServedModel, GenerationRequest]:
    """Validate a TGI body against the model and the server's limits; the internal request."""
    p = body.parameters
    unsupported = {"best_of": p.best_of not in (None, 1), "grammar": p.grammar is not None,
                   "typical_p": p.typical_p not in (None, 1.0), "watermark": p.watermark,
                   "frequency_penalty": p.frequency_penalty not in (None, 0.0), "adapter_id": p.adapter_id is not None}
    for name, used in unsupported.items():
        if used:
            raise ServeError("validation", f"`parameters.{name}` is not supported by this server; leave it out.",
                             param=f"parameters.{name}")
    served = _text_model(server, body.model)
    stops = server.check_stops(p.stop, "parameters.stop")
    ids = server.encode_prompt(served, body.inputs, "inputs", empty_starts_from_bos=False, truncate=p.truncate)
    max_input, max_total = server.limits(served)
    new_tokens = p.max_new_tokens
    if new_tokens is None:
        new_tokens = max(1, min(server.settings.default_max_new_tokens, max_total - len(ids)))
    server.check_lengths(served, len(ids), new_tokens)
    if served.draft is not None and p.repetition_penalty not in (None, 1.0):
        raise ServeError("validation", f"{served.name} decodes speculatively, which does not support "
                                       "`parameters.repetition_penalty`; leave it out.",
                         param="parameters.repetition_penalty")
    # TGI samples when asked to, or when any sampling setting is given.
    sampling = (p.do_sample or p.temperature not in (None, 1.0) or bool(p.top_k)
                or p.top_p not in (None, 1.0))
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=sampling,
        temperature=p.temperature if p.temperature is not None else 1.0,
        top_k=p.top_k or 0, top_p=p.top_p if p.top_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty or 1.0, eos_token_id=server.eos_token_ids(served))
    return served, GenerationRequest(ids, config, stop=stops, seed=p.seed, top_n=p.top_n_tokens or 0,
                                     prompt_logprobs=p.decoder_input_details and p.details)


def _version() -> str:
    from distillery.cli import _version as version

    return version()


__all__ = ["router", "generate", "generate_stream", "GenerateRequest", "Generation"]
