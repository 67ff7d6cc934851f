"""OpenAI's routes: completions (plain, streamed, logprobs, echo), chat, embeddings, models, errors."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
from serving import *  # noqa: F403 - the serve fixtures

from distillery.serve import load_served_model

PROMPT = "The meaning of life is"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def complete(client, status=200, **body):
    response = client.post("/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == status, response.text
    return response.json()


def chunks(client, path, body) -> list:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    blocks = [b.removeprefix("data: ") for b in raw.split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def test_completion_shape_usage_and_seeds(client, served):
    answer = complete(client, prompt=PROMPT, max_tokens=5, seed=3)
    assert answer["object"] == "text_completion" and answer["model"] == "tiny" and answer["id"].startswith("cmpl-")
    [choice] = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt_tokens = len(served["tiny"].tokenizer.encode(PROMPT))
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                               "total_tokens": prompt_tokens + 5}
    several = complete(client, prompt=PROMPT, max_tokens=5, seed=3, n=3)
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    assert several["choices"][0]["text"] == choice["text"]  # choice i samples with seed + i
    assert len({c["text"] for c in several["choices"]}) > 1
    greedy = complete(client, prompt=PROMPT, max_tokens=6, temperature=0)
    pipe = served["tiny"].runner
    assert greedy["choices"][0]["text"] == pipe(PROMPT, do_sample=False, max_new_tokens=6,
                                                return_full_text=False)[0]["generated_text"]


def test_prompt_lists_token_ids_stop_and_echo(client, served):
    tokenizer = served["tiny"].tokenizer
    answer = complete(client, prompt=["Hello", "World wide"], max_tokens=3, n=2, seed=1)
    assert len(answer["choices"]) == 4 and answer["usage"]["completion_tokens"] == 12
    by_ids = complete(client, prompt=tokenizer.encode(PROMPT), max_tokens=4, temperature=0)
    by_text = complete(client, prompt=PROMPT, max_tokens=4, temperature=0)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    text = complete(client, prompt=PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    stop = text[4:7]
    stopped = complete(client, prompt=PROMPT, max_tokens=8, temperature=0, stop=stop)["choices"][0]
    assert stopped["text"] == text[:text.index(stop)] and stopped["finish_reason"] == "stop"
    echoed = complete(client, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)["choices"][0]
    assert echoed["text"] == PROMPT + text[:len(echoed["text"]) - len(PROMPT)]
    logprobs = echoed["logprobs"]
    n_prompt = len(tokenizer.encode(PROMPT))
    assert len(logprobs["tokens"]) == n_prompt + 3 and logprobs["token_logprobs"][0] is None
    assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]
    assert all(lp < 0 for lp in logprobs["token_logprobs"][1:])
    assert logprobs["top_logprobs"][0] is None and all(1 <= len(t) <= 3 for t in logprobs["top_logprobs"][n_prompt:])


def test_streamed_completion_matches_the_whole_one(client):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    events = chunks(client, "/v1/completions", body)
    *pieces, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert all(e["object"] == "text_completion" and e["usage"] is None for e in pieces)
    assert len({e["id"] for e in events}) == 1
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"
    whole = complete(client, prompt=PROMPT, max_tokens=8, seed=5)["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in pieces) == whole
    # A stop string never shows, even when it arrives split over several tokens.
    stop = whole[2:9]
    streamed = chunks(client, "/v1/completions", {**body, "stop": [stop], "stream_options": None})
    assert "".join(e["choices"][0]["text"] for e in streamed) == whole[:whole.index(stop)]
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_list_says_what_the_playground_needs(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["object"], m["task"], m["mask_token"], m["max_positions"]) for m in data] == [
        ("tiny", "model", "text-generation", None, 64), ("mlm", "model", "fill-mask", "<mask>", 64),
        ("encoder", "model", "feature-extraction", None, 64)]
    assert client.get("/v1/models/mlm").json()["id"] == "mlm"
    assert client.get("/v1/models/nothing").status_code == 404


def test_embeddings_float_and_base64(client, served):
    body = {"model": "encoder", "input": ["A man is eating food.", "A cat."]}
    answer = client.post("/v1/embeddings", json=body).json()
    assert answer["object"] == "list" and answer["model"] == "encoder"
    vectors = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
    features = served["encoder"].runner(body["input"])
    expected = np.array([np.mean(f[0], axis=0) for f in features], dtype=np.float32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    tokens = sum(len(served["encoder"].tokenizer.encode(t)) for t in body["input"])
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    packed = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
    np.testing.assert_array_equal(decoded, vectors)
    assert client.post("/v1/embeddings", json={"model": "mlm", "input": "x"}).status_code == 200


def test_chat_needs_a_template(client, serve_dirs, tmp_path, make_client):
    answer = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "Hi"}]})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "no chat template" in error["message"] and error["code"] == "no_chat_template"
    folder = tmp_path / "chat"
    shutil.copytree(serve_dirs["gpt2"], folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    chat = load_served_model(f"chat={folder}")
    client = make_client([chat])
    body = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 2}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = "user: Hi\nassistant:"
    same = complete(client, model="chat", prompt=prompt, max_tokens=4, seed=2)
    assert message["content"] == same["choices"][0]["text"]
    assert answer["usage"]["prompt_tokens"] == len(chat.tokenizer.encode(prompt))
    streamed = chunks(client, "/v1/chat/completions", {**body, "stream": True})
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in streamed)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in streamed) == message["content"]
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"max_tokens": 2}, "prompt", ["`prompt` is required"]),
    ({"prompt": "x", "temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ({"prompt": "x", "top_p": 0}, "top_p", ["greater than 0"]),
    ({"prompt": "x", "top_p": 1.5}, "top_p", ["less than or equal to 1"]),
    ({"prompt": "x", "n": 0}, "n", ["greater than or equal to 1"]),
    ({"prompt": "x", "n": 500}, "n", ["less than or equal to 128"]),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", ["greater than or equal to 0"]),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", ["valid integer"]),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", ["up to 4"]),
    ({"prompt": "x", "logprobs": 6}, "logprobs", ["less than or equal to 5"]),
    ({"prompt": "x", "presence_penalty": 1.0}, "presence_penalty", ["not supported"]),
    ({"prompt": " word" * 70}, "prompt", ["at most 63 tokens", "70"]),
    ({"prompt": " word" * 60, "max_tokens": 10}, "max_tokens", ["<= 64", "60 `prompt` tokens and 10 `max_tokens`"]),
    ({"prompt": [99999999]}, "prompt", ["token ids"]),
    ({"prompt": "x", "model": "mlm"}, "model", ["fill-mask"]),
])
def test_bad_completions_are_400_naming_the_field(client, body, param, words):
    answer = complete(client, 400, **body)
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and all(w in error["message"] for w in words), error


def test_other_openai_errors(client):
    response = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = client.post("/v1/completions", content=b"]", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json={"model": "tiny", "input": "x"})
    assert response.status_code == 400 and "causal language model" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "model"
    response = client.post("/v1/embeddings", json={"model": "encoder", "input": "x " * 100})
    assert response.status_code == 400 and "at most 64" in response.json()["error"]["message"]
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and "message" in response.json()["error"]
