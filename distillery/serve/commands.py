"""`distillery serve`: an HTTP server for one or more models (TGI, Inference API and OpenAI routes)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading
from collections.abc import Callable

from distillery import cli_types
from distillery.cli import add_command, print_json
from distillery.models.common import DistilleryError

API_KEY_VARIABLE = "DISTILLERY_API_KEY"


def register(subparsers) -> None:
    p = add_command(subparsers, "serve", serve_command)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folder or hub id, or NAME=PATH to choose the name clients use (default name: the "
                        "folder's name, or the hub id); the first is the default model")
    p.add_argument("--host", default="127.0.0.1", type=_host, help="address to listen on (0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=cli_types.int_range(0, 65535, "0: any free port"), default=8000,
                   help="port to listen on")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights: float32 (default), bfloat16, float16, or int8 (CPU: int8 weights and activations)")
    p.add_argument("--device", default="cpu", type=cli_types.device, help="torch device")
    p.add_argument("--compile", action="store_true",
                   help="run the text-generation models' decode steps through torch.compile (each batch size "
                        "and length compiles on first use)")
    p.add_argument("--draft", metavar="MODEL",
                   help="speculative decoding for the first text-generation model: a smaller model with the same "
                        "tokenizer drafts tokens (that model then serves one request at a time)")
    p.add_argument("--draft-k", type=cli_types.positive_int, default=4, help="tokens drafted per round with --draft")
    p.add_argument("--draft-dtype", choices=["float32", "bfloat16", "float16", "int8"],
                   help="weights of the --draft model (default: --dtype)")
    p.add_argument("--api-key", default=None, type=cli_types.non_empty,
                   help=f"require `Authorization: Bearer KEY` on every route but /health (default: the "
                        f"{API_KEY_VARIABLE} environment variable, else no key)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", type=_origin,
                   help="allow browsers on this origin (e.g. http://localhost:3000) to call the API; repeatable "
                        "(default: no CORS headers)")
    p.add_argument("--max-concurrent-requests", type=cli_types.positive_int, default=128,
                   help="requests in flight at once; more get 429 at once")
    p.add_argument("--max-batch-size", type=cli_types.positive_int, default=32,
                   help="rows decoded together per model; further requests wait for a row")
    p.add_argument("--max-input-tokens", type=cli_types.positive_int,
                   help="longest prompt accepted, in tokens (default: the model's positions - 1)")
    p.add_argument("--max-total-tokens", type=cli_types.int_range(2),
                   help="longest prompt + generated tokens (default: the model's positions)")
    p.add_argument("--max-stop-sequences", type=cli_types.non_negative_int, default=4,
                   help="stop strings one request may give")
    p.add_argument("--max-body-bytes", type=cli_types.positive_int, default=2_000_000,
                   help="largest request body; larger ones get 413")
    p.add_argument("--request-timeout", type=cli_types.positive_float, default=300.0,
                   help="seconds one request may run before it is stopped")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    p.add_argument("--json", action="store_true", help="print the address and the models as JSON once ready")


def _host(value: str) -> str:
    if not cli_types.text(value).strip():
        raise argparse.ArgumentTypeError("is empty; pass an address such as 127.0.0.1 or 0.0.0.0.")
    return value.strip()


def _origin(value: str) -> str:
    """A browser origin: scheme and host (and port), as a browser sends it in its Origin header."""
    value = cli_types.text(value).strip().rstrip("/")
    if value != "*" and not (value.startswith(("http://", "https://")) and "/" not in value.split("://", 1)[1]):
        raise argparse.ArgumentTypeError(f"{value!r} is not an origin; pass one like http://localhost:3000 (or *).")
    return value


def serve_command(args: argparse.Namespace) -> int:
    """Serve models over HTTP: TGI's, the Inference API's and OpenAI's routes, and a playground page.

    Text generation runs in a continuous batch: requests join at a step boundary and leave when
    done, each with its own settings and seed. The server listens on 127.0.0.1 unless --host says
    otherwise; it prints its address at once and is ready when GET /health answers 200.
    Example: distillery serve distilgpt2 student=runs/distil/model distilroberta-base --port 8000
    Then:    curl localhost:8000/generate -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}' \\
                  -H 'Content-Type: application/json'
    """
    try:
        import fastapi  # noqa: F401 - only checking that it is there
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise DistilleryError(f"distillery serve needs FastAPI and uvicorn ({e.name} is missing); install them "
                              "with: pip install 'distillery[serve]'.") from None
    from distillery.serve.app import create_app
    from distillery.serve.served_models import (
        ModelRegistry,
        detect_task,
        expected_load_seconds,
        load_served_model,
        split_spec,
    )
    from distillery.serve.server import ServeSettings

    if args.max_input_tokens is not None and args.max_total_tokens is not None \
            and args.max_input_tokens >= args.max_total_tokens:
        raise DistilleryError(f"--max-input-tokens ({args.max_input_tokens}) must be below --max-total-tokens "
                              f"({args.max_total_tokens}), so that one token can be generated.")
    tasks = {}
    registry = ModelRegistry()
    for spec in args.models:
        name, source = split_spec(spec)
        tasks[name] = detect_task(source)  # a missing folder or broken config.json fails here, at once
        registry.expect(name, expected_load_seconds(source))
    if args.draft and "text-generation" not in tasks.values():
        raise DistilleryError("--draft needs a text-generation model among the MODELs; none is one.")
    settings = ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        cors_origins=tuple(args.cors_origin), max_concurrent_requests=args.max_concurrent_requests,
        max_batch_size=args.max_batch_size, max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens, max_stop_sequences=args.max_stop_sequences,
        max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout)
    sock = bind(args.host, args.port)
    try:
        url = f"http://{_url_host(args.host)}:{sock.getsockname()[1]}"
        app = create_app(registry, settings)
        draft_for = next((name for name, task in tasks.items() if task == "text-generation"), None)

        def load_models() -> None:
            for spec in args.models:
                name, _ = split_spec(spec)
                registry.add(load_served_model(
                    spec, dtype=args.dtype, device=args.device, compile=args.compile,
                    draft=args.draft if args.draft and name == draft_for else None, draft_dtype=args.draft_dtype,
                    draft_k=args.draft_k))
            if args.json:
                print_json({"url": url, "models": [m.describe() for m in registry.all()]})
                sys.stdout.flush()
            print(f"distillery serve: ready on {url} ({', '.join(registry.order)})", file=sys.stderr, flush=True)

        print(f"distillery serve: listening on {url} (loading {len(tasks)} model{'s' * (len(tasks) > 1)}; "
              f"ready when {url}/health answers 200)", file=sys.stderr, flush=True)
        run_server(app, sock, load_models, access_log=args.access_log)
    finally:
        sock.close()
    return 0


def run_server(app, sock: socket.socket, load_models: Callable[[], None], access_log: bool = False) -> None:
    """Serve `app` on `sock` until interrupted, while `load_models` runs in a thread; a model that
    fails to load stops the server and is reported as one sentence."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=access_log,
                                           timeout_graceful_shutdown=5))
    failure: list[BaseException] = []

    def load() -> None:
        try:
            load_models()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, which then exits 2
            failure.append(e)
            server.should_exit = True

    threading.Thread(target=load, name="distillery-model-loader", daemon=True).start()
    server.run(sockets=[sock])
    if failure:
        error = failure[0]
        if isinstance(error, DistilleryError):
            raise DistilleryError(f"A model did not load: {error}") from error
        raise DistilleryError(f"A model did not load ({type(error).__name__}: {error}).") from error


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one sentence saying why there cannot be one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DistilleryError(f"--host {host!r} is not an address this machine can listen on ({e.strerror}).") \
            from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DistilleryError(f"Port {port} on {host} is already in use; stop what listens there or pass "
                                  "another --port.") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise DistilleryError(f"No permission to listen on {host}:{port}; use a port above 1023.") from None
        raise DistilleryError(f"Cannot listen on {host}:{port} ({e.strerror}); pass another --host or --port.") \
            from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
