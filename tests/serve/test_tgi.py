"""TGI's routes: shapes, finish reasons, server-sent events, errors, and equality with the pipeline."""

from __future__ import annotations

import json

import pytest
from serving import *  # noqa: F403 - the serve fixtures
from serving import slowed

from distillery.pipelines import set_seed
from distillery.serve.tgi import GenerateResponse, SimpleToken, StreamResponse

PROMPT = "Hello, I'm a language model"


def generate(client, status=200, **body):
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    return response.json()


def stream_events(client, body) -> list[dict]:
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b.removeprefix("data: ")) for b in blocks]


def test_generate_with_details(make_client):
    client = make_client()
    answer = generate(client, inputs=PROMPT, parameters={
        "max_new_tokens": 6, "details": True, "decoder_input_details": True, "top_n_tokens": 3})
    GenerateResponse.model_validate(answer)
    details = answer["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 6 and details["seed"] is None
    tokens = details["tokens"]
    assert len(tokens) == 6 and set(tokens[0]) == {"id", "text", "logprob", "special"}
    assert answer["generated_text"] == "".join(t["text"] for t in tokens)
    assert all(t["logprob"] <= 0 for t in tokens)
    # Greedy: each token is the best of its top tokens, with the same log-probability.
    for token, top in zip(tokens, details["top_tokens"]):
        assert len(top) == 3 and top[0]["id"] == token["id"]
        assert top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-5)
    prefill = details["prefill"]
    tokenizer = client.app.state.server.registry.get("tiny").tokenizer
    assert [p["id"] for p in prefill] == tokenizer.encode(PROMPT)
    assert prefill[0]["logprob"] is None and all(p["logprob"] < 0 for p in prefill[1:])


def test_greedy_and_seeded_sampling_equal_the_pipeline(make_client, served):
    client = make_client()
    pipe = served["tiny"].runner
    greedy = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 10})
    expected = pipe(PROMPT, do_sample=False, max_new_tokens=10, return_full_text=False)
    assert greedy["generated_text"] == expected[0]["generated_text"]
    settings = {"do_sample": True, "temperature": 1.3, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.2}
    sampled = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 10, "seed": 7, **settings})
    set_seed(7)
    expected = pipe(PROMPT, max_new_tokens=10, return_full_text=False, **settings)
    assert sampled["generated_text"] == expected[0]["generated_text"]
    again = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 10, "seed": 7, **settings})
    assert again == sampled


def test_return_full_text_and_unseeded_sampling_reports_its_seed(make_client):
    client = make_client()
    answer = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 3, "return_full_text": True})
    assert answer["generated_text"].startswith(PROMPT)
    answer = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 3, "temperature": 0.8, "details": True})
    seed = answer["details"]["seed"]
    assert isinstance(seed, int)
    replay = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 3, "temperature": 0.8, "seed": seed})
    assert replay["generated_text"] == answer["generated_text"]


def test_finish_reasons(make_client):
    client = make_client()
    first = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 8, "details": True})
    tokens = first["details"]["tokens"]
    # A stop string taken from the greedy continuation ends it there (TGI keeps the stop string).
    stop = tokens[2]["text"]
    stopped = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 8, "details": True, "stop": [stop]})
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop) and len(stopped["details"]["tokens"]) <= 3
    # The first greedy token made the EOS token: the generation ends on it, marked special.
    server = client.app.state.server
    served_model = server.registry.get("tiny")
    eos_id = tokens[0]["id"]
    original = server.eos_token_ids
    server.eos_token_ids = lambda served: [eos_id]
    try:
        ended = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 8, "details": True})
    finally:
        server.eos_token_ids = original
    assert ended["details"]["finish_reason"] == "eos_token" and ended["details"]["generated_tokens"] == 1
    assert served_model.tokenizer.eos_token_id == 50256  # the real EOS is special:
    special = generate(client, inputs="<|endoftext|>", parameters={"max_new_tokens": 1, "details": True})
    assert special["details"]["finish_reason"] == "length"


def test_generate_stream_events(make_client):
    client = make_client()
    events = stream_events(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "seed": 3,
                                                                   "do_sample": True}})
    assert len(events) == 5
    for i, event in enumerate(events, start=1):
        StreamResponse.model_validate(event)
        assert event["index"] == i
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 5
    assert last["details"]["seed"] == 3 and last["details"]["input_length"] == len(
        client.app.state.server.registry.get("tiny").tokenizer.encode(PROMPT))
    whole = generate(client, inputs=PROMPT, parameters={"max_new_tokens": 5, "seed": 3, "do_sample": True})
    assert whole["generated_text"] == last["generated_text"]


def test_tokenize_info_health(make_client):
    client = make_client()
    text = "Hello world, 日本"
    response = client.post("/tokenize", json={"inputs": text})
    assert response.status_code == 200
    tokens = [SimpleToken.model_validate(t) for t in response.json()]
    tokenizer = client.app.state.server.registry.get("tiny").tokenizer
    assert [t.id for t in tokens] == tokenizer.encode(text)
    assert tokens[0].start == 0 and tokens[-1].stop == len(text)
    assert all(t.text == text[t.start:t.stop] for t in tokens)
    assert [t.start for t in tokens] == sorted(t.start for t in tokens)  # a character split in two shares its span
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 64 and info["max_input_tokens"] == 63
    assert [(m["name"], m["task"], m["mask_token"]) for m in info["models"]] == [
        ("tiny", "text-generation", None), ("mlm", "fill-mask", "<mask>"), ("encoder", "feature-extraction", None)]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("body", "field"), [
    ({"parameters": {"max_new_tokens": 2}}, "inputs"),
    ({"inputs": 3}, "inputs"),
    ({"inputs": "x", "parameters": {"temperature": -0.5}}, "parameters.temperature"),
    ({"inputs": "x", "parameters": {"top_p": 1.5}}, "parameters.top_p"),
    ({"inputs": "x", "parameters": {"top_p": 0}}, "parameters.top_p"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "parameters.stop"),
    ({"inputs": "x", "parameters": {"stop": [""]}}, "parameters.stop"),
    ({"inputs": "x", "parameters": {"best_of": 2}}, "parameters.best_of"),
    ({"inputs": "x", "parameters": {"temprature": 0.5}}, "parameters.temprature"),
    ({"inputs": ""}, "inputs"),
    ({"inputs": "x", "model": "mlm"}, "model"),
])
def test_bad_bodies_are_422_naming_the_field(make_client, body, field):
    client = make_client()
    answer = generate(client, 422, **body)
    assert answer["error_type"] == "validation" and f"`{field}" in answer["error"], answer


def test_bad_json_unknown_model_and_stream_details(make_client):
    client = make_client()
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]
    response = client.post("/generate", json=["a list"])
    assert response.status_code == 422 and "JSON object" in response.json()["error"]
    response = client.post("/generate", json={"inputs": "x", "model": "../../etc/passwd"})
    assert response.status_code == 404 and "not served" in response.json()["error"]
    response = client.post("/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert response.status_code == 422 and "decoder_input_details" in response.json()["error"]


def test_lengths_past_the_limits_are_422_with_the_numbers(make_client):
    client = make_client()
    long_prompt = " word" * 70
    answer = generate(client, 422, inputs=long_prompt)
    assert "at most 63 tokens" in answer["error"] and "Given: 70" in answer["error"]
    answer = generate(client, 422, inputs=" word" * 60, parameters={"max_new_tokens": 10})
    assert "must be <= 64" in answer["error"] and "60 `inputs` tokens and 10 `max_new_tokens`" in answer["error"]
    client = make_client(max_input_tokens=8, max_total_tokens=12)
    assert "at most 8 tokens" in generate(client, 422, inputs=" word" * 9)["error"]
    answer = generate(client, inputs=" word" * 8, parameters={"details": True})  # default: the room left
    assert answer["details"]["generated_tokens"] == 4
    truncated = generate(client, inputs=" word" * 20, parameters={"truncate": 5, "max_new_tokens": 2,
                                                                  "details": True})
    assert truncated["details"]["generated_tokens"] == 2


def test_time_limit_is_a_424_generation_error(make_client, served):
    client = make_client(request_timeout=0.05)
    undo = slowed(served["tiny"], 0.02)
    try:
        answer = generate(client, 424, inputs=PROMPT, parameters={"max_new_tokens": 30})
    finally:
        undo()
    assert answer["error_type"] == "generation" and "time limit" in answer["error"]


def test_a_model_failure_is_a_424_and_the_server_goes_on(make_client, served):
    client = make_client()
    model = served["tiny"].model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    model.forward = broken
    try:
        answer = generate(client, 424, inputs=PROMPT, parameters={"max_new_tokens": 3})
    finally:
        del model.forward
    assert answer == {"error": "Generation failed (RuntimeError: out of memory, say).", "error_type": "generation"}
    assert generate(client, inputs=PROMPT, parameters={"max_new_tokens": 3})["generated_text"]
