"""API key (401), body size limit (413), CORS only when asked, /metrics, and the page."""

from __future__ import annotations

from serving import *  # noqa: F403 - the serve fixtures

GENERATE = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}


def test_api_key_is_needed_everywhere_but_health(make_client):
    client = make_client(api_key="sesame")
    refused = client.post("/generate", json=GENERATE)
    assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"
    refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"},
                          headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "not this server's" in refused.json()["error"]["message"]
    for method, path in (("GET", "/v1/models"), ("GET", "/info"), ("GET", "/metrics"), ("POST", "/models/mlm"),
                         ("POST", "/"), ("POST", "/tokenize"), ("GET", "/"), ("GET", "/static/playground.js")):
        assert client.request(method, path).status_code == 401, path
    assert client.get("/health").status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer sesame"}).status_code == 200
    allowed = client.post("/generate", json=GENERATE, headers={"Authorization": "Bearer sesame"})
    assert allowed.status_code == 200
    assert client.get("/metrics", headers={"Authorization": "bearer sesame"}).status_code == 200


def test_bodies_over_the_limit_are_413(make_client):
    client = make_client(max_body_bytes=1000)
    big = {"inputs": "x" * 2000}
    response = client.post("/generate", json=big)
    assert response.status_code == 413 and response.json()["error_type"] == "validation"
    assert "1000 bytes" in response.json()["error"]
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 2000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * 400

    response = client.post("/generate", content=chunked(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.post("/generate", json=GENERATE).status_code == 200


def test_no_cors_headers_unless_an_origin_is_allowed(make_client):
    origin = {"Origin": "http://evil.example"}
    client = make_client()
    response = client.post("/generate", json=GENERATE, headers=origin)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = client.options("/generate", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    client = make_client(cors_origins=("http://localhost:3000",), api_key="k")
    preflight = client.options("/generate", headers={"Origin": "http://localhost:3000",
                                                     "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    response = client.post("/generate", json=GENERATE, headers={"Origin": "http://localhost:3000",
                                                                "Authorization": "Bearer k"})
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    response = client.post("/generate", json=GENERATE, headers={**origin, "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in response.headers


def test_metrics_in_prometheus_text_format(client):
    client.post("/generate", json=GENERATE)
    client.post("/generate", json={"inputs": 1})
    client.post("/models/mlm", json={"inputs": "a <mask> b"})
    text = client.get("/metrics").text
    for line in ('distillery_request_count_total{route="/generate",status="200"} 1',
                 'distillery_request_count_total{route="/generate",status="422"} 1',
                 'distillery_request_failure_total{reason="validation"} 1',
                 'distillery_request_generated_tokens_count{model="tiny"} 1',
                 'distillery_request_input_tokens_bucket{model="tiny",le="1"} 1',
                 'distillery_time_to_first_token_seconds_count{model="tiny"} 1',
                 'distillery_time_per_output_token_seconds_count{model="tiny"} 1',
                 'distillery_request_queue_duration_seconds_count{model="tiny"} 1',
                 'distillery_batch_size_count{model="tiny"} 1',
                 "distillery_queue_size 0", "distillery_requests_in_flight 0"):
        assert line in text, line
    for name in ("distillery_request_duration_seconds", "distillery_batch_current_size"):
        assert f"# TYPE {name} " in text
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert all(len(ln.rsplit(" ", 1)) == 2 and ln.rsplit(" ", 1)[1].replace(".", "").replace("e-", "").isdigit()
               for ln in samples), samples


def test_the_page_and_its_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/does-not-exist.js").status_code == 404
