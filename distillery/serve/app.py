"""The FastAPI application: the three dialects' routes over one scheduler, plus the page.

    app = create_app([load_served_model("distilgpt2")], ServeSettings())
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: TGI's (/generate, /generate_stream, /tokenize, /info, /health), the Inference API's
(/models/{name}), OpenAI's (/v1/...), /metrics, `POST /` as TGI and Inference Endpoints answer it
for the default (first) model, and `GET /` the playground page (its files under /static).

Around every route one ASGI layer (`Guard`) counts the request in /metrics, refuses a body over
`max_body_bytes` (413) and, with an API key, a request without `Authorization: Bearer <key>`
(401 on every route but /health, the page included: a browser cannot send the header, so the
playground is for servers without a key, or behind a proxy that adds it). CORS headers are sent
only for `cors_origins`. Every error leaves in the dialect of its route.
"""

from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distillery.serve import hf_api, openai_api, tgi
from distillery.serve.errors import ServeError, parse_body
from distillery.serve.served_models import ModelRegistry, ServedModel
from distillery.serve.server import Server, ServeSettings

STATIC = Path(__file__).parent / "static"
PLACEHOLDER_PAGE = "<!doctype html><title>distillery</title><p>distillery is serving; see /v1/models and /info.</p>"


def create_app(models: list[ServedModel] | ModelRegistry, settings: ServeSettings | None = None) -> FastAPI:
    """The server for `models` (loaded ones, or a registry that more are being loaded into)."""
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry(list(models))
    server = Server(registry, settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    # No /docs: every endpoint and field is listed in the README, and the fewer open routes the better.
    app = FastAPI(title="distillery", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.include_router(tgi.router)
    app.include_router(hf_api.router)
    app.include_router(openai_api.router)

    @app.post("/")
    async def default_model_route(request: Request) -> Any:
        """TGI's and Inference Endpoints' `POST /`: the default model answers by its task."""
        raw = await request.body()
        served = server.registry.default()
        if served.task == "text-generation":
            body = parse_body(raw, tgi.GenerateRequest)
            body.model = body.model or served.name
            return await (tgi.generate_stream(request, body) if body.stream else tgi.generate(request, body))
        return await hf_api.answer(request, served, parse_body(raw, hf_api.InferenceRequest))

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        index = STATIC / "index.html"
        return FileResponse(index) if index.is_file() else HTMLResponse(PLACEHOLDER_PAGE)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        server.metrics.count_failure(error.kind)
        dialect = dialect_of(request.scope["path"], server.registry)
        return JSONResponse(error.body(dialect), status_code=error.status(dialect))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        dialect = dialect_of(request.scope["path"], server.registry)
        message = {404: f"No route {request.method} {request.scope['path']} here.",
                   405: f"{request.method} is not allowed on {request.scope['path']}."}.get(error.status_code,
                                                                                          str(error.detail))
        kind = "not_found" if error.status_code == 404 else "validation"
        body = ServeError(kind, message).body(dialect)
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    app.add_middleware(Guard, server=server)
    if server.settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(server.settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])
    return app


def dialect_of(path: str, registry: ModelRegistry) -> str:
    """Which API's error shape a path answers in: "openai", "hf" or "tgi"."""
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/models/"):
        return "hf"
    if path == "/" and registry.order:
        first = registry.order[0]
        if first in registry.loaded and registry.loaded[first].task != "text-generation":
            return "hf"
    return "tgi"


OPEN_PATHS = ("/health",)  # answered without the API key


class BodyTooLarge(Exception):
    pass


class Guard:
    """Pure ASGI (streams pass through untouched): metrics, body size limit, API key."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500, "started": False}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await self._reply(scope, send_counted, refusal)
                return
            try:
                await self.app(scope, self._limited(receive), send_counted)
            except BodyTooLarge:
                if status["started"]:  # nothing more can be said
                    raise
                await self._reply(scope, send_counted, self._too_large())
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            self.server.metrics.observe_request(label, status["code"], time.monotonic() - started)

    def _refusal(self, scope: Scope) -> ServeError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.server.settings.max_body_bytes:
            return self._too_large()
        key = self.server.settings.api_key
        path = scope["path"]
        if key and path not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ServeError("unauthorized", "This server needs an API key: send the header "
                                                  "`Authorization: Bearer <key>`." if not given else
                                  "The API key in the Authorization header is not this server's.")
        return None

    def _too_large(self) -> ServeError:
        return ServeError("too_large", f"The request body is larger than this server's limit of "
                                       f"{self.server.settings.max_body_bytes} bytes (--max-body-bytes).")

    def _limited(self, receive: Receive) -> Receive:
        """`receive`, refusing a body (even one without Content-Length) past the limit."""
        seen = 0
        limit = self.server.settings.max_body_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        return limited

    async def _reply(self, scope: Scope, send: Send, error: ServeError) -> None:
        self.server.metrics.count_failure(error.kind)
        dialect = dialect_of(scope["path"], self.server.registry)
        headers = {"WWW-Authenticate": "Bearer"} if error.kind == "unauthorized" else None
        response = JSONResponse(error.body(dialect), status_code=error.status(dialect), headers=headers)
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
