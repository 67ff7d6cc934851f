"""`distillery serve`: ready when /health says so; a port in use, a model that does not load or an
unknown dtype is one sentence and exit 2."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT
from serving import *  # noqa: F403 - the serve fixtures

from distillery.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("distillery serve: listening")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("(default: 127.0.0.1)", "(default: 8000)", "(default: 128)", "--api-key", "--cors-origin",
                 "DISTILLERY_API_KEY", "--json"):
        assert text in out


def test_a_port_in_use_is_one_sentence(capsys, serve_dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", serve_dirs["gpt2"], "--port", port)
    assert code == 2 and f"Port {port} on 127.0.0.1 is already in use" in one_line_error(err)


def test_a_model_that_does_not_load_is_one_sentence(capsys, serve_dirs, tmp_path):
    code, _, err = run(capsys, "serve", tmp_path / "missing", "--port", 0)
    assert code == 2 and "No such model folder" in one_line_error(err)
    broken = tmp_path / "broken"
    shutil.copytree(serve_dirs["gpt2"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    code, _, err = run(capsys, "serve", serve_dirs["gpt2"], broken, "--port", 0)  # fails after binding
    line = one_line_error(err)
    assert code == 2 and line.startswith("distillery serve: error: A model did not load") and "broken" in line


@pytest.mark.parametrize(("argv", "words"), [
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--port", "70000"], "from 0 to 65535"),
    (["--max-concurrent-requests", "0"], "at least 1"),
    (["--request-timeout", "nan"], "finite number"),
    (["--cors-origin", "localhost"], "not an origin"),
    (["--host", ""], "is empty"),
    (["--max-input-tokens", "10", "--max-total-tokens", "10"], "must be below --max-total-tokens"),
])
def test_bad_flags_are_one_sentence(capsys, serve_dirs, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        code = main(["serve", str(serve_dirs["gpt2"]), *argv])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert words in one_line_error(capsys.readouterr().err)


def test_serve_prints_its_url_and_answers_once_healthy(serve_dirs):
    env = {**os.environ, "DISTILLERY_API_KEY": "k", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "distillery.cli", "serve", f"tiny={serve_dirs['gpt2']}", str(serve_dirs["mlm"]),
         "--port", "0", "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's usual handling even when the tests run as a background job, which ignores SIGINT
        # and passes that on (the server would then exit 0 after its graceful shutdown).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = process.stderr.readline()
        url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first).group(1)
        ready = json.loads(process.stdout.readline() + "".join(iter(process.stdout.readline, "}\n")) + "}")
        assert ready["url"] == url and [m["name"] for m in ready["models"]] == ["tiny", "mlm"]
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        headers = {"Authorization": "Bearer k"}  # from the environment variable
        assert httpx.post(url + "/generate", json={"inputs": "Hi"}).status_code == 401
        answer = httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}},
                            headers=headers)
        assert answer.status_code == 200 and answer.json()["generated_text"]
        assert httpx.post(url + "/models/mlm", json={"inputs": "a <mask>"}, headers=headers).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown, then the usual 130
        code = process.wait(timeout=20)
        rest = process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    assert code == 130 and "Traceback" not in rest, rest
