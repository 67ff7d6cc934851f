"""The clients people use, unchanged, against a real server on a loopback port: the `openai`
package and huggingface_hub's InferenceClient."""

from __future__ import annotations

import numpy as np
import pytest
from serving import *  # noqa: F403 - the serve fixtures
from serving import live_server

from distillery.serve import ServeSettings, create_app

KEY = "test-key"


@pytest.fixture(scope="module")
def urls(served):
    """Two servers: text generation first (the default model of POST /), and fill-mask first."""
    with live_server(create_app(list(served.values()), ServeSettings(api_key=KEY))) as text_url, \
            live_server(create_app([served["mlm"], served["encoder"]], ServeSettings())) as mask_url:
        yield {"text": text_url, "mask": mask_url}


def test_openai_package(urls, served):
    import openai

    client = openai.OpenAI(base_url=urls["text"] + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "mlm", "encoder"]
    completion = client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=6, seed=4)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 6
    text = completion.choices[0].text
    streamed = list(client.completions.create(model="tiny", prompt="Hello, my name is", max_tokens=6, seed=4,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert streamed[-1].usage.completion_tokens == 6
    embedding = client.embeddings.create(model="encoder", input=["A cat.", "A dog."])  # base64 on the wire
    as_floats = client.embeddings.create(model="encoder", input=["A cat.", "A dog."], encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in embedding.data]),
                                  np.array([d.embedding for d in as_floats.data]))
    assert len(embedding.data[0].embedding) == 16
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=urls["text"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_inference_client_text_generation(urls, served):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(base_url=urls["text"], token=KEY)
    text = client.text_generation("Hello, my name is", max_new_tokens=6)
    expected = served["tiny"].runner("Hello, my name is", do_sample=False, max_new_tokens=6, return_full_text=False)
    assert text == expected[0]["generated_text"]
    detailed = client.text_generation("Hello, my name is", max_new_tokens=6, details=True, decoder_input_details=True,
                                      seed=3, do_sample=True)
    assert detailed.details.finish_reason == "length" and detailed.details.generated_tokens == 6
    assert detailed.details.seed == 3 and len(detailed.details.tokens) == 6 and detailed.details.prefill
    assert "".join(client.text_generation("Hello, my name is", max_new_tokens=6, stream=True)) == text
    events = list(client.text_generation("Hello, my name is", max_new_tokens=6, stream=True, details=True))
    assert len(events) == 6 and events[-1].generated_text == text and events[-1].details.finish_reason == "length"
    with pytest.raises(ValidationError, match="top_p"):
        client.text_generation("Hello", top_p=1.5)


def test_inference_client_fill_mask_and_feature_extraction(urls, served):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=urls["mask"])
    text = "Paris is the <mask> of France."
    predictions = client.fill_mask(text, top_k=3)
    expected = served["mlm"].runner(text, top_k=3)
    assert [(p.token, p.token_str, p.sequence) for p in predictions] == [
        (e["token"], e["token_str"], e["sequence"]) for e in expected]
    assert [p.score for p in predictions] == pytest.approx([e["score"] for e in expected])
    features = InferenceClient(model=urls["mask"] + "/models/encoder").feature_extraction("Hello there")
    expected = np.array(served["encoder"].runner("Hello there"), dtype=np.float32)
    assert features.shape == expected.shape == (1, len(served["encoder"].tokenizer.encode("Hello there")), 16)
    np.testing.assert_allclose(features, expected, atol=1e-6)
