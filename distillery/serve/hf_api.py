"""The Hugging Face Inference API: `POST /models/{name}` with `{"inputs", "parameters", "options"}`.

The model's task decides what the route does, and the answer is exactly what that pipeline
returns: `[{"generated_text": ...}]` for text-generation, the fill-mask predictions
(`[{"score", "token", "token_str", "sequence"}]`, a list of those per mask when a text has
several), and the feature-extraction features (per-token vectors (1, T, C) per text; pooled
sentence embeddings for a sentence-transformers model, as the Inference API gives them).
Errors are `{"error": "..."}` with 400 (404 for a model not served; 503 with `estimated_time`
while it is still loading).

Text generation takes the pipeline's settings (`max_new_tokens`, `max_length`, `do_sample`,
`temperature`, `top_k`, `top_p`, `repetition_penalty`, `num_return_sequences`,
`return_full_text`) with the pipeline's defaults, plus `stop`, `seed` and `max_time`, and runs in
the continuous batch; with `num_return_sequences` n, sequence i samples with seed + i.
Other names are refused in transformers' words ("The following `model_kwargs` are not used by
the model: [...]"), which `InferenceClient` reads to drop them and retry.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distillery.models.common import DistilleryError
from distillery.pipelines.text_generation import cut_at_stop
from distillery.serve.errors import ServeError, parse_body, validation_error
from distillery.serve.scheduler import GenerationRequest
from distillery.serve.served_models import ServedModel
from distillery.serve.server import Server, run_to_end

router = APIRouter()


class Options(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    use_cache: bool = True  # answers are never cached here
    wait_for_model: bool = False  # wait instead of 503 while the model loads


class InferenceRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    inputs: str | list[str]
    parameters: dict[str, Any] = Field(default_factory=dict)
    options: Options = Field(default_factory=Options)


class TextGenerationParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    max_new_tokens: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=1)
    do_sample: bool | None = None
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    num_return_sequences: int | None = Field(None, ge=1, le=16)
    return_full_text: bool = True
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    max_time: float | None = Field(None, gt=0)


class FillMaskParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    top_k: int = Field(5, ge=1)
    targets: str | list[str] | None = None


class FeatureExtractionParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    truncate: bool | None = None
    truncation: bool | None = None  # the pipeline's name for `truncate`
    normalize: bool = False


PARAMETERS = {"text-generation": TextGenerationParameters, "fill-mask": FillMaskParameters,
              "feature-extraction": FeatureExtractionParameters}


@router.post("/models/{name:path}")
async def inference_route(name: str, request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    body = parse_body(await request.body(), InferenceRequest)
    name = name.split("/pipeline/")[0]  # the router's /models/{id}/pipeline/{task} form
    served = await _served(server, name, body.options.wait_for_model or
                           request.headers.get("x-wait-for-model", "").lower() == "true")
    return await answer(request, served, body)


async def answer(request: Request, served: ServedModel, body: InferenceRequest) -> JSONResponse:
    """Run `body` on `served` by its task (also what POST / does for a fill-mask or feature-extraction model)."""
    server: Server = request.app.state.server
    parameters = _parameters(served.task, body.parameters)
    if served.task == "text-generation":
        return JSONResponse(await _text_generation(request, server, served, body.inputs, parameters))
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts:
        raise ServeError("validation", "`inputs` is an empty list; send a text or a list of texts.", param="inputs")
    slot = server.admit()
    try:
        if served.task == "fill-mask":
            result = await server.run_encoder(lambda: served.runner(body.inputs, top_k=parameters.top_k,
                                                                    targets=parameters.targets))
        else:
            truncate = bool(parameters.truncate or parameters.truncation)
            result = await server.run_encoder(lambda: features(served, body.inputs, truncate, parameters.normalize))
    finally:
        slot.release()
    return JSONResponse(result)


async def _served(server: Server, name: str, wait: bool) -> ServedModel:
    """The served model `name`; with `wait`, a model still loading is waited for (up to the time limit)."""
    deadline = time.monotonic() + server.settings.request_timeout
    while True:
        try:
            return server.registry.get(name)
        except ServeError as e:
            if e.kind != "loading" or not wait or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.25)


def _parameters(task: str, given: dict[str, Any]) -> Any:
    model = PARAMETERS[task]
    unknown = sorted(set(given) - set(model.model_fields))
    if unknown:
        if task == "text-generation":
            # transformers' wording, which huggingface_hub's InferenceClient recognises.
            raise ServeError("validation", f"The following `model_kwargs` are not used by the model: {unknown} "
                                           "(note: typos in the generate arguments will also show up in this list)",
                             param=f"parameters.{unknown[0]}")
        raise ServeError("validation", f"`parameters.{unknown[0]}` is not a {task} parameter; it takes "
                                       f"{', '.join(model.model_fields)}.", param=f"parameters.{unknown[0]}")
    try:
        return model.model_validate(given)
    except ValidationError as e:
        raise validation_error(e, "parameters.") from None


async def _text_generation(request: Request, server: Server, served: ServedModel, inputs: str | list[str],
                           p: TextGenerationParameters) -> list[Any]:
    """The text-generation pipeline's answer, generated in the continuous batch."""
    prompts = [inputs] if isinstance(inputs, str) else inputs
    if not prompts:
        raise ServeError("validation", "`inputs` is an empty list; send a prompt or a list of prompts.",
                         param="inputs")
    stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    server.check_stops(stops, "parameters.stop")
    settings = {k: getattr(p, k) for k in ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
                                           "top_p", "repetition_penalty", "num_return_sequences")}
    try:
        config = served.runner.generation_config(**{k: v for k, v in settings.items() if v is not None})
    except DistilleryError as e:
        raise ServeError("validation", str(e)) from None
    n = config.num_return_sequences
    requests = []
    for prompt in prompts:
        ids = server.encode_prompt(served, prompt, "inputs")
        try:
            new_tokens = config.new_tokens_for(len(ids))
        except DistilleryError as e:
            raise ServeError("validation", str(e), param="parameters.max_length") from None
        server.check_lengths(served, len(ids), new_tokens, "inputs", "parameters.max_new_tokens")
        row_config = replace(config, max_new_tokens=new_tokens, max_length=None, num_return_sequences=1)
        for _ in range(n):
            seed = None if p.seed is None else p.seed + len(requests)
            requests.append(GenerationRequest(ids, row_config, stop=stops, seed=seed, timeout=p.max_time))
    slot, handles = server.start(served, requests)
    generations = await run_to_end(request, slot, handles)
    results = []
    for j, prompt in enumerate(prompts):
        records = []
        for generation in generations[j * n : (j + 1) * n]:
            text = cut_at_stop(generation.text, stops)
            records.append({"generated_text": prompt + text if p.return_full_text else text})
        results.append(records)
    return results[0] if isinstance(inputs, str) else results


def features(served: ServedModel, inputs: str | list[str], truncate: bool, normalize: bool) -> list[Any]:
    """What the feature-extraction pipeline returns (per-token vectors), or pooled sentence
    embeddings for a sentence-transformers model; `normalize` scales each vector to length 1."""
    if served.sentence_encoder:
        return served.runner.encode(inputs, normalize_embeddings=normalize).tolist()
    result = served.runner(inputs, truncation=truncate or None, return_tensors=normalize)
    if not normalize:
        return result
    tensors = [result] if isinstance(inputs, str) else result
    normalized = [torch.nn.functional.normalize(t, dim=-1).tolist() for t in tensors]
    return normalized[0] if isinstance(inputs, str) else normalized
