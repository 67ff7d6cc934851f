"""Continuous batching: exactness among strangers, joining and leaving at step boundaries, a
client that leaves, backpressure (429), and int8, compiled and speculative models in the batch."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from serving import *  # noqa: F403 - the serve fixtures
from serving import live_server, slowed

from distillery.generation.config import GenerationConfig
from distillery.serve import ServeSettings, create_app, load_served_model
from distillery.serve.scheduler import FinishEvent, GenerationRequest, TokenEvent
from distillery.serve.served_models import ModelRegistry
from distillery.serve.server import Server

PROMPT = "The quick brown fox jumps over"


def held(server: Server) -> threading.Event:
    """Block the scheduler thread (with a job) until the returned event is set, so that requests
    submitted meanwhile all wait for the same step boundary."""
    release = threading.Event()
    server.scheduler.run_job(release.wait)
    return release


async def tokens_of(handle) -> list[TokenEvent]:
    out = []
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            out.append(event)
        assert not hasattr(event, "error"), event
    return out


def request(served_model, text: str, seed: int | None = None, **settings) -> GenerationRequest:
    settings.setdefault("max_new_tokens", 10)
    return GenerationRequest(served_model.tokenizer.encode(text), GenerationConfig(**settings), seed=seed, top_n=2)


@pytest.mark.parametrize("target_settings", [
    dict(do_sample=True, temperature=1.2, top_k=30, top_p=0.9, repetition_penalty=1.1, max_new_tokens=14),
    dict(do_sample=False, repetition_penalty=1.3, max_new_tokens=14),
], ids=["sampled", "greedy"])
def test_a_request_gives_the_same_tokens_alone_and_among_strangers(served, target_settings):
    tiny = served["tiny"]
    server = Server(ModelRegistry([tiny]), ServeSettings())
    sizes: list[int] = []
    server.scheduler.step_observer = lambda name, rows: sizes.append(rows)

    async def alone():
        return await tokens_of(server.submit(tiny, request(tiny, PROMPT, seed=11, **target_settings)))

    async def among_strangers():
        early = [server.submit(tiny, request(tiny, "A much longer prompt than the other one, with many words " * 2,
                                             seed=5, do_sample=True, max_new_tokens=20)),
                 server.submit(tiny, request(tiny, "Hi", max_new_tokens=3))]
        target = server.submit(tiny, request(tiny, PROMPT, seed=11, **target_settings))
        late, got = [], []
        async for event in target.events():
            if isinstance(event, TokenEvent):
                got.append(event)
                if len(got) == 4:  # strangers that join while the target runs (and leave before it)
                    late = [server.submit(tiny, request(tiny, "Once upon", seed=99, do_sample=True, top_k=5,
                                                        max_new_tokens=5)),
                            server.submit(tiny, request(tiny, "x", repetition_penalty=2.0, max_new_tokens=30))]
        assert isinstance(event, FinishEvent) and event.reason == "length"
        for other in await asyncio.gather(*(tokens_of(h) for h in early + late)):
            assert other
        return got

    try:
        expected = asyncio.run(alone())
        sizes.clear()
        got = asyncio.run(among_strangers())
    finally:
        server.close()
    assert [t.id for t in got] == [t.id for t in expected]
    for a, b in zip(got, expected):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]
    assert max(sizes) >= 3, sizes  # it really shared its steps


def test_requests_join_and_leave_at_step_boundaries(served):
    tiny = served["tiny"]
    server = Server(ModelRegistry([tiny]), ServeSettings())
    sizes: list[int] = []
    server.scheduler.step_observer = lambda name, rows: sizes.append(rows)
    undo = slowed(tiny, 0.01)

    async def scenario():
        first = server.submit(tiny, request(tiny, PROMPT, max_new_tokens=12))
        count, second = 0, None
        async for event in first.events():
            count += isinstance(event, TokenEvent)
            if count == 3 and second is None:
                second = server.submit(tiny, request(tiny, "Hello", max_new_tokens=3))
        return await tokens_of(second)

    try:
        second_tokens = asyncio.run(scenario())
    finally:
        undo()
        server.close()
    # The first request's 11 decode steps (its first token comes from the prefill); the second
    # joined at a boundary, was in exactly two of them (3 tokens, the first from its own
    # prefill) and left at once.
    assert len(second_tokens) == 3
    assert len(sizes) == 11 and sizes.count(2) == 2, sizes
    joined = sizes.index(2)
    assert sizes[joined:joined + 2] == [2, 2] and set(sizes) == {1, 2}


def test_rows_admitted_together_share_every_step(served):
    tiny = served["tiny"]
    server = Server(ModelRegistry([tiny]), ServeSettings(max_batch_size=2))
    sizes: list[int] = []
    server.scheduler.step_observer = lambda name, rows: sizes.append(rows)

    async def scenario():
        release = held(server)
        handles = [server.submit(tiny, request(tiny, f"prompt {i}", max_new_tokens=4)) for i in range(3)]
        release.set()
        return await asyncio.gather(*(tokens_of(h) for h in handles))

    try:
        results = asyncio.run(scenario())
    finally:
        server.close()
    assert [len(r) for r in results] == [4, 4, 4]
    # Two rows fit (max_batch_size=2): they decode together; the third waits for a free row.
    assert sizes == [2, 2, 2, 1, 1, 1], sizes


def test_a_client_that_leaves_stops_costing_compute(served):
    tiny = served["tiny"]
    app = create_app([tiny], ServeSettings())
    server = app.state.server
    steps: list[int] = []
    server.scheduler.step_observer = lambda name, rows: steps.append(rows)
    undo = slowed(tiny, 0.02)
    try:
        with live_server(app) as url:
            with httpx.Client(base_url=url, timeout=10) as http:
                body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 50}}
                with http.stream("POST", "/generate_stream", json=body) as response:
                    lines = response.iter_lines()
                    assert next(lines).startswith("data:")  # one token arrived; then the client hangs up
                deadline = time.monotonic() + 5
                while server.scheduler.running_rows() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert server.scheduler.running_rows() == 0
                assert len(steps) < 15, len(steps)  # 50 were asked for
                steps.clear()
                # The same for a plain request whose client gives up waiting.
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/generate", json=body, timeout=0.3)
                deadline = time.monotonic() + 5
                while (server.scheduler.running_rows() or not steps) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert server.scheduler.running_rows() == 0 and len(steps) < 40, len(steps)
                metrics = http.get("/metrics").text
        assert 'distillery_request_failure_total{reason="cancelled"} 2' in metrics
    finally:
        undo()


def test_beyond_max_concurrent_requests_is_429_at_once(served):
    app = create_app(list(served.values()), ServeSettings(max_concurrent_requests=1))
    undo = slowed(served["tiny"], 0.02)
    try:
        with live_server(app) as url, httpx.Client(base_url=url, timeout=10) as http:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20}}
            with http.stream("POST", "/generate_stream", json=body) as stream:
                lines = stream.iter_lines()  # kept: a dropped iterator closes the response
                next(lines)  # in flight
                started = time.monotonic()
                refused = http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
                assert time.monotonic() - started < 1
                assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
                refused = http.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
                assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
                refused = http.post("/models/mlm", json={"inputs": "a <mask>"})
                assert refused.status_code == 429 and "overloaded" in refused.json()["error"]
                assert any('"finish_reason": "length"' in line for line in lines)
            assert http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200
    finally:
        undo()


def test_int8_model_decodes_in_the_batch(serve_dirs, make_client):
    int8 = load_served_model(f"tiny8={serve_dirs['gpt2']}", dtype="int8")
    client = make_client([int8])
    expected = int8.runner(PROMPT, do_sample=False, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}).json() == {
        "generated_text": expected}
    # Batched, each row still gets its own tokens (int8 quantises each step's activations as a
    # whole, so a row's scores may move with its neighbours: no exactness claimed here).
    results = {}

    def go(i):
        results[i] = client.post("/generate", json={"inputs": PROMPT + " x" * i,
                                                     "parameters": {"max_new_tokens": 6, "details": True}}).json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i]["details"]["generated_tokens"] == 6 for i in range(3))


def test_compiled_model_decodes_in_the_batch(serve_dirs, served, monkeypatch):
    # Inductor with frozen weights (what --compile uses on a CPU) took about a minute per batch
    # shape here, so this test compiles the batch step with the aot_eager backend: it checks that
    # the step and the batch cache trace into one graph and give the eager tokens.
    import distillery.serve.scheduler as scheduler

    monkeypatch.setattr(scheduler, "compile_with_frozen_weights",
                        lambda fn, device: torch.compile(fn, dynamic=True, backend="aot_eager"))
    compiled = load_served_model(f"compiled={serve_dirs['gpt2']}", compile=True)
    server = Server(ModelRegistry([compiled, served["tiny"]]), ServeSettings())

    async def both(name):
        served_model = compiled if name == "compiled" else served["tiny"]
        release = held(server)
        handles = [server.submit(served_model, request(served_model, text, max_new_tokens=5))
                   for text in (PROMPT, "Hello there")]
        release.set()
        return [[t.id for t in tokens] for tokens in await asyncio.gather(*(tokens_of(h) for h in handles))]

    try:
        assert asyncio.run(both("compiled")) == asyncio.run(both("tiny"))
    finally:
        server.close()


def test_speculative_model_serves_one_request_at_a_time(serve_dirs, served, make_client):
    pair = load_served_model(f"pair={serve_dirs['gpt2']}", draft=str(serve_dirs["gpt2"]), draft_k=3)
    client = make_client([pair, served["tiny"]])
    sizes = []
    client.app.state.server.scheduler.step_observer = lambda name, rows: sizes.append(name)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    speculative = client.post("/generate", json=body).json()
    plain = client.post("/generate", json={**body, "model": "tiny"}).json()
    assert speculative["generated_text"] == plain["generated_text"]
    for a, b in zip(speculative["details"]["tokens"], plain["details"]["tokens"]):
        assert a["id"] == b["id"] and a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert "pair" not in sizes  # no decode steps: the draft and one verifying pass per round
    refused = client.post("/generate", json={"inputs": "x", "parameters": {"repetition_penalty": 1.2}})
    assert refused.status_code == 422 and "speculatively" in refused.json()["error"]
