"""The Inference API's `POST /models/{name}`: the pipelines' own answers, and `{"error"}` with 400/404/503."""

from __future__ import annotations

import dataclasses

import pytest
from serving import *  # noqa: F403 - the serve fixtures

from distillery.serve import ServeSettings, create_app
from distillery.serve.served_models import ModelRegistry


def post(client, name, status=200, **body):
    response = client.post(f"/models/{name}", json=body)
    assert response.status_code == status, response.text
    return response.json()


def test_text_generation_is_the_pipelines_answer(client, served):
    pipe = served["tiny"].runner
    settings = {"max_new_tokens": 7, "do_sample": False}
    assert post(client, "tiny", inputs="Hello there", parameters=settings) == pipe("Hello there", **settings)
    both = post(client, "tiny", inputs=["Hello", "A longer prompt here"], parameters={**settings,
                                                                                     "return_full_text": False})
    assert both == pipe(["Hello", "A longer prompt here"], return_full_text=False, **settings)
    sampled = post(client, "tiny", inputs="Hello", parameters={"max_new_tokens": 5, "num_return_sequences": 3,
                                                              "seed": 4})
    assert len(sampled) == 3 and all(r["generated_text"].startswith("Hello") for r in sampled)
    assert post(client, "tiny", inputs="Hello", parameters={"max_new_tokens": 5, "num_return_sequences": 3,
                                                            "seed": 4}) == sampled


def test_text_generation_stop_strings_are_cut_as_the_pipeline_cuts_them(client, served):
    pipe = served["tiny"].runner
    text = pipe("Hello", do_sample=False, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    stop = text[3:6]
    got = post(client, "tiny", inputs="Hello", parameters={"do_sample": False, "max_new_tokens": 6, "stop": stop,
                                                           "return_full_text": False})
    assert got == pipe("Hello", do_sample=False, max_new_tokens=6, stop=stop, return_full_text=False)
    assert got[0]["generated_text"] == text[:text.index(stop)]


def test_fill_mask_and_feature_extraction_are_the_pipelines_answers(client, served):
    text = "Paris is the <mask> of France."
    assert post(client, "mlm", inputs=text, parameters={"top_k": 3}) == served["mlm"].runner(text, top_k=3)
    two = "The <mask> sat on the <mask>."
    assert post(client, "mlm", inputs=two) == served["mlm"].runner(two)
    assert post(client, "mlm", inputs=text, parameters={"targets": [" capital", " city"]}) == served["mlm"].runner(
        text, targets=[" capital", " city"])
    features = post(client, "encoder", inputs="Replace me by any text you'd like.")
    assert features == served["encoder"].runner("Replace me by any text you'd like.")
    normalized = post(client, "encoder", inputs="Hello", parameters={"normalize": True})
    assert all(sum(v * v for v in vector) == pytest.approx(1, abs=1e-5) for vector in normalized[0])
    # The router's /models/{id}/pipeline/{task} form is the same route.
    assert client.post("/models/encoder/pipeline/feature-extraction", json={"inputs": "Hello"}).status_code == 200


@pytest.mark.parametrize(("name", "body", "words"), [
    ("mlm", {"inputs": "No mask in this text."}, ["No mask token", "<mask>"]),
    ("mlm", {"inputs": "a <mask>", "parameters": {"top_k": 0}}, ["parameters.top_k"]),
    ("mlm", {"inputs": "a <mask>", "parameters": {"topk": 2}}, ["parameters.topk", "not a fill-mask parameter"]),
    ("mlm", {"inputs": []}, ["inputs", "empty"]),
    ("mlm", {"parameters": {}}, ["`inputs` is required"]),
    ("mlm", {"inputs": 5}, ["inputs"]),
    ("tiny", {"inputs": "x", "parameters": {"temperature": -1}}, ["parameters.temperature"]),
    ("tiny", {"inputs": "x", "parameters": {"top_p": 2}}, ["parameters.top_p"]),
    ("tiny", {"inputs": "x", "parameters": {"details": True}},
     ["The following `model_kwargs` are not used by the model: ['details']"]),
    ("tiny", {"inputs": "x", "parameters": {"num_return_sequences": 2, "do_sample": False}},
     ["num_return_sequences"]),
    ("tiny", {"inputs": " word" * 70}, ["at most 63 tokens", "70"]),
    ("tiny", {"inputs": "x", "parameters": {"max_length": 1}}, ["max_length"]),
    ("encoder", {"inputs": "x", "parameters": {"prompt_name": "query"}}, ["parameters.prompt_name"]),
    ("encoder", {"inputs": "x", "options": {"wait_for_model": "yes"}}, ["options.wait_for_model"]),
])
def test_bad_input_is_400_naming_it(client, name, body, words):
    answer = post(client, name, 400, **body)
    assert set(answer) == {"error"}
    assert all(w in answer["error"] for w in words), answer


def test_unknown_model_names_are_404_and_never_paths(client, serve_dirs):
    answer = post(client, "no-such-model", 404, inputs="x")
    assert "not served" in answer["error"] and "tiny" in answer["error"]
    for name in (str(serve_dirs["gpt2"]), "../../etc/passwd", "%2E%2E%2Fgpt2"):
        assert client.post(f"/models/{name}", json={"inputs": "x"}).status_code == 404


def test_a_model_still_loading_is_503_with_an_estimated_time(served):
    from fastapi.testclient import TestClient

    registry = ModelRegistry([served["mlm"]])
    registry.expect("later", expected_seconds=30)
    with TestClient(create_app(registry, ServeSettings())) as client:
        answer = post(client, "later", 503, inputs="x")
        assert "loading" in answer["error"] and 25 < answer["estimated_time"] <= 30
        assert client.get("/health").status_code == 503
        registry.add(dataclasses.replace(served["tiny"], name="later"))
        assert client.get("/health").status_code == 200
        assert post(client, "later", inputs="Hi", parameters={"max_new_tokens": 2})[0]["generated_text"]
