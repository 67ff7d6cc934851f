"""Fixtures of the serve tests: tiny served models on the real GPT-2 and RoBERTa vocabularies,
apps made of them, and a real uvicorn server on a free loopback port.

A module, not a conftest.py: a second conftest.py would replace the `conftest` module the other
test folders import helpers from. Test files import the fixtures they use from here.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_vocab, save_tiny_gpt2, save_tiny_roberta

from distillery.serve import ServeSettings, create_app, load_served_model

__all__ = ["serve_dirs", "served", "make_client", "client"]  # the fixtures; `from serving import *` takes them


@pytest.fixture(scope="session")
def serve_dirs(tmp_path_factory, shared_data) -> dict[str, Path]:
    """gpt2 (causal LM, 64 positions), mlm (RoBERTa masked LM) and encoder (bare RobertaModel)."""
    root = tmp_path_factory.mktemp("serve-models")
    gpt2 = save_tiny_gpt2(root / "gpt2", vocab_size=50257, n_embd=16, n_head=2)
    mlm = save_tiny_roberta(root / "mlm", vocab_size=50265, hidden_size=16, num_attention_heads=2)
    encoder = save_tiny_roberta(root / "encoder", cls_name="RobertaModel", vocab_size=50265, hidden_size=16,
                                num_attention_heads=2)
    copy_vocab(shared_data, "gpt2", gpt2)
    for directory in (mlm, encoder):
        copy_vocab(shared_data, "roberta", directory)
    return {"gpt2": gpt2, "mlm": mlm, "encoder": encoder}


@pytest.fixture(scope="session")
def served(serve_dirs):
    """The three models loaded for serving, named tiny, mlm and encoder (tiny is the default)."""
    return {name: load_served_model(f"{name}={serve_dirs[key]}")
            for name, key in (("tiny", "gpt2"), ("mlm", "mlm"), ("encoder", "encoder"))}


@pytest.fixture
def make_client(served):
    """make_client(models=None, **settings) -> a TestClient of a fresh app (closed after the test)."""
    from fastapi.testclient import TestClient

    clients = []

    def make(models=None, **settings):
        chosen = list(served.values()) if models is None else models
        client = TestClient(create_app(chosen, ServeSettings(**settings)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its URL."""
    import uvicorn

    from distillery.serve.commands import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def slowed(served_model, seconds: float):
    """Make every forward pass of `served_model`'s model sleep first (to hold requests in flight);
    returns a function that undoes it."""
    model = served_model.model
    original = model.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    model.forward = forward
    return lambda: model.__dict__.pop("forward", None)
