"""`distillery serve` under load: many clients, right and wrong requests, clients that leave.

    .venv/bin/python bench/bench_serve.py                                  # 1,000 requests, 16 clients
    .venv/bin/python bench/bench_serve.py --requests 40 --concurrency 8   # a quick run
    .venv/bin/python bench/bench_serve.py --model runs/distil/model --json

The server runs in its own process (`distillery serve`, on a free loopback port) with a
distilgpt2-shaped GPT-2 and a distilroberta-shaped RoBERTa masked LM (random weights, the real
GPT-2 and RoBERTa vocabularies from ../shared/data/tokenizers, or folders given with --model and
--mlm). The clients (asyncio + httpx, in this process) send a shuffled mix: TGI /generate_stream
and /generate, OpenAI /v1/completions streamed and not, fill-mask on /models/{mlm}, embeddings on
/v1/embeddings, and about one in five invalid (bad JSON, wrong types, too long, unknown model,
negative limits); some streaming clients hang up after a few tokens.

It reports whether every valid request was answered completely and every invalid one with a 4xx
JSON error, that nothing got a 5xx, that the server is still alive afterwards and its memory (RSS,
read from /proc) is back at its level before the load; time to first token and inter-token
latency (p50, p99; from TGI's stream, one event per token), requests/s and generated tokens/s.
Then the same greedy streams served one at a time and --streams at once, side by side: continuous
batching should give >= 3x the aggregate tokens/s. Clients and server share the machine's cores,
so on a small CPU the clients' own work is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillery.models.common import DistilleryError  # noqa: E402

PRESET = "preset:"
PROMPTS = [
    "The history of the city begins in the early Middle Ages, when",
    "Hello, I'm a language model,",
    "In 1905 the physicist published four papers that",
    "The recipe calls for two cups of flour and",
    "def fibonacci(n):",
    "The committee met on Tuesday to discuss",
    "Once upon a time, in a village by the sea,",
    "The stock market fell sharply after",
]
MASK_TEXTS = ["Paris is the <mask> of France.", "Hello I'm a <mask> model.", "The man worked as a <mask>.",
              "She opened the <mask> and walked in.", "The <mask> was delicious, and the <mask> was cold."]
SPEED_GOAL = 3.0  # aggregate tokens/s at --streams concurrent streams over one at a time
RSS_TOLERANCE = (0.05, 32.0)  # "back to its starting level": within 5% or 32 MB, whichever is larger


# ----------------------------------------------------------------------------------------------
# The models and the server


def prepare_model(spec: str, kind: str, tokenizer_dir: Path, root: Path) -> str:
    """A folder to serve: `spec` itself, or for preset:NAME random weights of that shape saved with
    the real vocabulary (`kind`: "gpt2" or "roberta")."""
    if not spec.startswith(PRESET):
        return spec
    import torch

    from distillery.generation.bench import check_preset
    from distillery.models import build_model, preset_config

    check_preset(spec)
    if not (tokenizer_dir / "vocab.json").is_file():
        raise DistilleryError(f"{tokenizer_dir} has no vocab.json; pass --tokenizers with the folder holding the "
                              "gpt2/ and roberta/ vocabularies (../shared/data/tokenizers).")
    torch.manual_seed(0)
    model = build_model(preset_config(spec[len(PRESET):]), "masked-lm" if kind == "roberta" else None)
    directory = root / kind
    model.save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return str(directory)


class ServerProcess:
    """`distillery serve` in a child process on a free loopback port; its log goes to a file."""

    def __init__(self, models: list[str], log: Path, extra: list[str]) -> None:
        self.log = log
        command = [sys.executable, "-c", "import sys; from distillery.cli import main; sys.exit(main())",
                   "serve", *models, "--port", "0", *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env,
                                        cwd=ROOT)
        self.url = self._address()

    def _address(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DistilleryError(f"distillery serve exited with {self.process.returncode}: {self.log_tail()}")
            for line in self.log.read_text().splitlines():
                if "listening on " in line:
                    return line.split("listening on ")[1].split()[0]
            time.sleep(0.1)
        raise DistilleryError(f"distillery serve did not start in {timeout:.0f} s: {self.log_tail()}")

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DistilleryError(f"distillery serve exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise DistilleryError(f"the models did not load in {timeout:.0f} s: {self.log_tail()}")

    def rss_mb(self) -> float:
        """Resident memory of the server process now (VmRSS in /proc, Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise DistilleryError("/proc/PID/status has no VmRSS line; this benchmark reads memory on Linux only.")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ----------------------------------------------------------------------------------------------
# Requests


@dataclass
class Spec:
    """One request of the plan: where it goes, its raw body, and what a right answer looks like."""

    kind: str  # tgi-stream, tgi-generate, openai-stream, openai-completion, fill-mask, embeddings, invalid-...
    path: str
    body: bytes
    valid: bool
    top_k: int = 0  # fill-mask: the fillers per mask expected
    hang_up_after: int | None = None  # streams: tokens read before the client disconnects


@dataclass
class Outcome:
    kind: str
    valid: bool
    status: int | None = None
    problem: str = ""  # empty when the answer is what the request deserved
    tokens: int = 0  # generated tokens received
    first_token: float | None = None  # seconds from sending to the first token (TGI streams)
    gaps: list[float] = field(default_factory=list)  # seconds between successive tokens (TGI streams)
    hung_up: bool = False


def plan(n: int, rng: random.Random, gpt2: str, mlm: str) -> list[Spec]:
    """`n` requests: about 80% valid (generation streamed and not, fill-mask, embeddings), 20% invalid,
    and one stream in ten hung up on after 1-3 tokens."""
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def generation(stream: bool, openai: bool) -> Spec:
        prompt = rng.choice(PROMPTS)
        new_tokens = rng.randint(4, 32)
        sampling = {"seed": rng.randrange(2**31)} if rng.random() < 0.5 else {}
        hang_up = rng.randint(1, 3) if stream and rng.random() < 0.1 else None
        if openai:
            body = {"model": gpt2, "prompt": prompt, "max_tokens": new_tokens, "stream": stream,
                    "temperature": 0.8 if sampling else 0, **sampling}
            if stream:
                body["stream_options"] = {"include_usage": True}
            return Spec("openai-stream" if stream else "openai-completion", "/v1/completions", dumps(body), True,
                        hang_up_after=hang_up)
        parameters = {"max_new_tokens": new_tokens, "details": not stream,
                      **({"do_sample": True, "top_p": 0.95, **sampling} if sampling else {})}
        return Spec("tgi-stream" if stream else "tgi-generate", "/generate_stream" if stream else "/generate",
                    dumps({"model": gpt2, "inputs": prompt, "parameters": parameters}), True, hang_up_after=hang_up)

    def fill_mask() -> Spec:
        k = rng.randint(1, 8)
        return Spec("fill-mask", f"/models/{mlm}", dumps({"inputs": rng.choice(MASK_TEXTS),
                                                          "parameters": {"top_k": k}}), True, top_k=k)

    def embeddings() -> Spec:
        texts = rng.sample(PROMPTS, rng.randint(1, 3))
        return Spec("embeddings", "/v1/embeddings", dumps({"model": mlm, "input": texts}), True)

    long_prompt = "word " * 1500  # past distilgpt2's 1024 positions
    invalid = [
        ("invalid-json", "/generate", b'{"inputs": "Hello", "parameters": {'),
        ("invalid-json", "/v1/completions", b'{"model": "x", "prompt": '),
        ("invalid-type", "/generate", dumps({"model": gpt2, "inputs": 42})),
        ("invalid-type", "/generate_stream", dumps({"model": gpt2, "inputs": "Hi",
                                                    "parameters": {"max_new_tokens": "ten"}})),
        ("invalid-type", f"/models/{mlm}", dumps({"inputs": "A <mask>.", "parameters": {"top_k": "five"}})),
        ("invalid-type", "/v1/embeddings", dumps({"model": mlm, "input": {"text": "hi"}})),
        ("invalid-long", "/generate", dumps({"model": gpt2, "inputs": long_prompt})),
        ("invalid-long", "/generate_stream", dumps({"model": gpt2, "inputs": "Hi",
                                                    "parameters": {"max_new_tokens": 5000}})),
        ("invalid-long", "/v1/embeddings", dumps({"model": mlm, "input": long_prompt})),
        ("invalid-model", "/generate", dumps({"model": "no-such-model", "inputs": "Hi"})),
        ("invalid-model", "/models/no-such-model", dumps({"inputs": "A <mask>."})),
        ("invalid-model", "/v1/completions", dumps({"model": "no-such-model", "prompt": "Hi"})),
        ("invalid-negative", "/generate", dumps({"model": gpt2, "inputs": "Hi", "parameters": {"max_new_tokens": -1}})),
        ("invalid-negative", f"/models/{mlm}", dumps({"inputs": "A <mask>.", "parameters": {"top_k": -3}})),
        ("invalid-negative", "/v1/completions", dumps({"model": gpt2, "prompt": "Hi", "max_tokens": -5})),
    ]
    makers = [(0.25, lambda: generation(True, False)), (0.12, lambda: generation(False, False)),
              (0.10, lambda: generation(True, True)), (0.06, lambda: generation(False, True)),
              (0.17, fill_mask), (0.10, embeddings)]
    specs = []
    for _ in range(n):
        r = rng.random()
        for weight, make in makers:
            if r < weight:
                specs.append(make())
                break
            r -= weight
        else:
            kind, path, body = rng.choice(invalid)
            specs.append(Spec(kind, path, body, False))
    return specs


async def send(client, spec: Spec) -> Outcome:
    """Send one request and judge its answer."""
    import httpx

    outcome = Outcome(spec.kind, spec.valid)
    headers = {"Content-Type": "application/json"}
    try:
        if spec.kind.endswith("-stream"):
            sent = time.perf_counter()
            async with client.stream("POST", spec.path, content=spec.body, headers=headers) as response:
                outcome.status = response.status_code
                if response.status_code != 200:
                    judge_answer(spec, outcome, await response.aread())
                    return outcome
                await read_stream(spec, outcome, response, sent)
        else:
            response = await client.post(spec.path, content=spec.body, headers=headers)
            outcome.status = response.status_code
            judge_answer(spec, outcome, response.content)
    except httpx.HTTPError as e:
        outcome.problem = f"transport error: {type(e).__name__}: {e}"
    return outcome


async def read_stream(spec: Spec, outcome: Outcome, response, sent: float) -> None:
    """Read server-sent events to the end (or hang up after `spec.hang_up_after` tokens) and judge them."""
    events, last = [], None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data)
        if data == "[DONE]":
            continue
        event = json.loads(data)
        token = event.get("token") is not None or bool(event.get("choices") and event["choices"][0].get("text"))
        if token and spec.kind == "tgi-stream":
            now = time.perf_counter()
            if last is None:
                outcome.first_token = now - sent
            else:
                outcome.gaps.append(now - last)
            last = now
        if token:
            outcome.tokens += 1
        if spec.hang_up_after is not None and outcome.tokens >= spec.hang_up_after:
            outcome.hung_up = True
            return  # leaving the `async with` closes the connection mid-stream
    outcome.problem = judge_stream(spec, [e if e == "[DONE]" else json.loads(e) for e in events], outcome)


def judge_stream(spec: Spec, events: list[Any], outcome: Outcome) -> str:
    if not events:
        return "the stream ended without an event"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        return f"error event: {errors[0]}"
    if spec.kind == "tgi-stream":
        final = events[-1]
        if final.get("generated_text") is None or not final.get("details"):
            return "the last event has no generated_text/details"
        if final["details"]["generated_tokens"] != len(events):
            return f"{len(events)} token events for generated_tokens={final['details']['generated_tokens']}"
        return ""
    if events[-1] != "[DONE]":
        return "the stream did not end with [DONE]"
    usage = [e["usage"] for e in events[:-1] if e.get("usage")]
    finished = [c for e in events[:-1] for c in e.get("choices", []) if c.get("finish_reason")]
    if not usage or not finished:
        return "no usage chunk or no finish_reason"
    outcome.tokens = usage[-1]["completion_tokens"]
    return ""


def judge_answer(spec: Spec, outcome: Outcome, raw: bytes) -> None:
    """A non-streamed answer (or a stream refused before it began): right shape, or a 4xx JSON error."""
    try:
        body = json.loads(raw)
    except ValueError:
        outcome.problem = f"status {outcome.status} with a body that is not JSON: {raw[:120]!r}"
        return
    if not spec.valid:
        if not (400 <= (outcome.status or 0) < 500):
            outcome.problem = f"an invalid request got status {outcome.status}"
        elif not (isinstance(body, dict) and "error" in body):
            outcome.problem = f"a {outcome.status} without an `error` field: {raw[:120]!r}"
        return
    if outcome.status != 200:
        outcome.problem = f"status {outcome.status}: {raw[:200]!r}"
        return
    try:
        if spec.kind == "tgi-generate":
            assert isinstance(body["generated_text"], str)
            outcome.tokens = body["details"]["generated_tokens"]
        elif spec.kind == "openai-completion":
            assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["finish_reason"]
            outcome.tokens = body["usage"]["completion_tokens"]
        elif spec.kind == "fill-mask":
            masks = body if body and isinstance(body[0], list) else [body]
            assert all(len(m) == spec.top_k and {"score", "token", "token_str", "sequence"} <= set(m[0])
                       for m in masks)
        elif spec.kind == "embeddings":
            vectors = [d["embedding"] for d in body["data"]]
            assert vectors and len({len(v) for v in vectors}) == 1
            assert all(math.isfinite(x) for v in vectors for x in v)
    except (AssertionError, KeyError, IndexError, TypeError) as e:
        outcome.problem = f"an incomplete answer ({type(e).__name__}): {raw[:200]!r}"


async def run_clients(url: str, specs: list[Spec], concurrency: int) -> tuple[list[Outcome], float]:
    """Send `specs` from `concurrency` clients, each taking the next request when its last is answered."""
    import httpx

    queue = list(reversed(specs))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            while queue:
                outcomes.append(await send(client, queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# The two measurements


def load_test(server: ServerProcess, specs: list[Spec], concurrency: int) -> dict[str, Any]:
    rss_before = settled_rss(server)
    peak = [rss_before]

    async def sample_memory(done: asyncio.Event) -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            await asyncio.sleep(0.2)

    async def run() -> tuple[list[Outcome], float]:
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(done))
        try:
            return await run_clients(server.url, specs, concurrency)
        finally:
            done.set()
            await sampler

    outcomes, seconds = asyncio.run(run())
    rss_after = settled_rss(server)
    alive = server.alive() and health(server.url)
    left = gauges(server.url) if alive else {}
    valid = [o for o in outcomes if o.valid and not o.hung_up]
    invalid = [o for o in outcomes if not o.valid]
    first_tokens = [o.first_token for o in outcomes if o.first_token is not None]
    gaps = [g for o in outcomes for g in o.gaps]
    tokens = sum(o.tokens for o in outcomes if o.valid)
    tolerance = max(RSS_TOLERANCE[0] * rss_before, RSS_TOLERANCE[1])
    kinds: dict[str, dict[str, int]] = {}
    for o in outcomes:
        entry = kinds.setdefault(o.kind, {"sent": 0, "right": 0})
        entry["sent"] += 1
        entry["right"] += not o.problem
    return {
        "requests": len(outcomes), "concurrency": concurrency, "seconds": seconds,
        "valid": len(valid), "valid_answered_completely": sum(not o.problem for o in valid),
        "invalid": len(invalid), "invalid_answered_4xx_json": sum(not o.problem for o in invalid),
        "hung_up_mid_stream": sum(o.hung_up for o in outcomes),
        "status_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "transport_errors": sum(1 for o in outcomes if o.status is None),
        "problems": [f"{o.kind}: {o.problem}" for o in outcomes if o.problem][:10],
        "by_kind": kinds,
        "server_alive_after": alive,
        "server_idle_after": alive and left["in_flight"] == left["queued"] == left["batch_rows"] == 0,
        "cancelled_by_server": left.get("cancelled", 0.0),
        "rss_mb_before": rss_before, "rss_mb_peak": peak[0], "rss_mb_after": rss_after,
        "rss_back_to_start": rss_after <= rss_before + tolerance, "rss_tolerance_mb": tolerance,
        "ttft_ms_p50": percentile(first_tokens, 50) * 1e3, "ttft_ms_p99": percentile(first_tokens, 99) * 1e3,
        "itl_ms_p50": percentile(gaps, 50) * 1e3, "itl_ms_p99": percentile(gaps, 99) * 1e3,
        "requests_per_s": len(outcomes) / seconds, "generated_tokens": tokens,
        "generated_tokens_per_s": tokens / seconds,
    }


def batching_gain(server: ServerProcess, gpt2: str, requests: int, streams: int, new_tokens: int) -> dict[str, Any]:
    """The same greedy streams one at a time, then `streams` at once: aggregate generated tokens/s."""
    body = lambda prompt: json.dumps({"model": gpt2, "inputs": prompt,  # noqa: E731
                                      "parameters": {"max_new_tokens": new_tokens}}).encode()
    specs = [Spec("tgi-stream", "/generate_stream", body(PROMPTS[i % len(PROMPTS)]), True) for i in range(requests)]
    result = {}
    for label, concurrency in (("one_at_a_time", 1), (f"{streams}_at_once", streams)):
        outcomes, seconds = asyncio.run(run_clients(server.url, specs, concurrency))
        wrong = [o.problem for o in outcomes if o.problem]
        if wrong:
            raise DistilleryError(f"a stream of the batching comparison failed: {wrong[0]}")
        tokens = sum(o.tokens for o in outcomes)
        result[label] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                         "itl_ms_p50": percentile([g for o in outcomes for g in o.gaps], 50) * 1e3}
    one, many = result["one_at_a_time"], result[f"{streams}_at_once"]
    result["speed_up"] = many["tokens_per_s"] / one["tokens_per_s"]
    result["goal"] = SPEED_GOAL
    result["streams"] = streams
    return result


def warm_up(server: ServerProcess, gpt2: str, mlm: str) -> None:
    """One request of each valid kind, so that first-call costs are paid before anything is measured."""
    specs = [s for s in plan(60, random.Random(1), gpt2, mlm) if s.valid and s.hang_up_after is None]
    seen: dict[str, Spec] = {}
    for spec in specs:
        seen.setdefault(spec.kind, spec)
    outcomes, _ = asyncio.run(run_clients(server.url, list(seen.values()), 1))
    for o in outcomes:
        if o.problem:
            raise DistilleryError(f"the warm-up {o.kind} request failed: {o.problem}")


def settled_rss(server: ServerProcess, seconds: float = 2.0) -> float:
    """The server's RSS once it has been idle a moment (the lowest of a few readings)."""
    readings = []
    for _ in range(5):
        time.sleep(seconds / 5)
        readings.append(server.rss_mb())
    return min(readings)


def gauges(url: str) -> dict[str, float]:
    """The server's /metrics gauges that say whether work is left: requests in flight, the queue,
    rows in the running batches (summed over models); and its cancelled requests."""
    import httpx

    wanted = {"distillery_requests_in_flight": "in_flight", "distillery_queue_size": "queued",
              "distillery_batch_current_size": "batch_rows"}
    found = {"in_flight": 0.0, "queued": 0.0, "batch_rows": 0.0, "cancelled": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{")[0]
        if base in wanted:
            found[wanted[base]] += float(value.split()[0])
        elif base == "distillery_request_failure_total" and 'reason="cancelled"' in name:
            found["cancelled"] += float(value.split()[0])
    return found


def health(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between the closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def finite(obj: Any) -> Any:
    """`obj` with NaN (a percentile of nothing) as null, so that the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Report


def print_report(load: dict[str, Any], gain: dict[str, Any]) -> None:
    def check(ok: bool) -> str:
        return "yes" if ok else "NO"

    print(f"Load: {load['requests']} requests from {load['concurrency']} clients in {load['seconds']:.1f} s")
    rows = [
        ("valid answered completely", f"{load['valid_answered_completely']}/{load['valid']}",
         check(load["valid_answered_completely"] == load["valid"])),
        ("invalid answered with a 4xx JSON error", f"{load['invalid_answered_4xx_json']}/{load['invalid']}",
         check(load["invalid_answered_4xx_json"] == load["invalid"])),
        ("5xx answers", str(load["status_5xx"]), check(load["status_5xx"] == 0)),
        ("transport errors", str(load["transport_errors"]), check(load["transport_errors"] == 0)),
        ("clients that hung up mid-stream / cancelled", f"{load['hung_up_mid_stream']} / "
                                                         f"{load['cancelled_by_server']:.0f}", ""),
        ("server alive afterwards", "", check(load["server_alive_after"])),
        ("nothing left running (in flight, queue, rows)", "", check(load["server_idle_after"])),
        ("server RSS before / peak / after (MB)",
         f"{load['rss_mb_before']:.0f} / {load['rss_mb_peak']:.0f} / {load['rss_mb_after']:.0f}",
         check(load["rss_back_to_start"])),
        ("time to first token p50 / p99 (ms)", f"{load['ttft_ms_p50']:.0f} / {load['ttft_ms_p99']:.0f}", ""),
        ("inter-token latency p50 / p99 (ms)", f"{load['itl_ms_p50']:.1f} / {load['itl_ms_p99']:.1f}", ""),
        ("requests/s", f"{load['requests_per_s']:.1f}", ""),
        ("generated tokens/s", f"{load['generated_tokens_per_s']:.1f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, ok in rows:
        print(f"  {name:<{width}}  {value:>17}  {ok}")
    for kind, entry in sorted(load["by_kind"].items()):
        print(f"    {kind:<20} {entry['right']:>4}/{entry['sent']:<4} right")
    for problem in load["problems"]:
        print(f"  problem: {problem}")
    one, many = gain["one_at_a_time"], gain[f"{gain['streams']}_at_once"]
    print(f"\nContinuous batching: the same {one['generated_tokens']} greedy tokens")
    print(f"  {'':<22} {'one at a time':>14} {str(gain['streams']) + ' at once':>12}")
    print(f"  {'seconds':<22} {one['seconds']:>14.2f} {many['seconds']:>12.2f}")
    print(f"  {'generated tokens/s':<22} {one['tokens_per_s']:>14.1f} {many['tokens_per_s']:>12.1f}")
    print(f"  {'inter-token p50 (ms)':<22} {one['itl_ms_p50']:>14.1f} {many['itl_ms_p50']:>12.1f}")
    print(f"  speed-up {gain['speed_up']:.2f}x (goal >= {gain['goal']:.0f}x): {check(gain['speed_up'] >= gain['goal'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests in the load test")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once (8-32 in the issue)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams in the batching comparison")
    parser.add_argument("--compare-requests", type=int, default=16, help="streams in the batching comparison")
    parser.add_argument("--compare-tokens", type=int, default=32, help="tokens each comparison stream generates")
    parser.add_argument("--model", default="preset:distilgpt2", help="GPT-2 to serve: a folder or preset:NAME")
    parser.add_argument("--mlm", default="preset:distilroberta-base",
                        help="RoBERTa masked LM to serve (fill-mask and embeddings): a folder or preset:NAME")
    parser.add_argument("--tokenizers", type=Path, default=ROOT.parent / "shared" / "data" / "tokenizers",
                        help="folder with gpt2/ and roberta/ vocabularies, for preset models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `distillery serve` (repeatable), e.g. --server-arg=--dtype=int8")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "streams", "compare_requests", "compare_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        try:
            gpt2_dir = prepare_model(args.model, "gpt2", args.tokenizers / "gpt2", root)
            mlm_dir = prepare_model(args.mlm, "roberta", args.tokenizers / "roberta", root)
        except DistilleryError as e:
            print(f"bench_serve: {e}", file=sys.stderr)
            return 2
        server = ServerProcess([f"gpt2={gpt2_dir}", f"mlm={mlm_dir}"], root / "server.log", args.server_arg)
        try:
            server.wait_ready()
            print(f"server {server.url} (pid {server.process.pid}) ready", file=sys.stderr)
            warm_up(server, "gpt2", "mlm")
            gain = batching_gain(server, "gpt2", args.compare_requests, args.streams, args.compare_tokens)
            specs = plan(args.requests, random.Random(args.seed), "gpt2", "mlm")
            load = load_test(server, specs, args.concurrency)
        except DistilleryError as e:
            print(f"bench_serve: {e}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    if args.json:
        print(json.dumps(finite({"load": load, "batching": gain}), indent=2, allow_nan=False))
    else:
        print_report(load, gain)
    passed = (load["valid_answered_completely"] == load["valid"] and load["status_5xx"] == 0
              and load["invalid_answered_4xx_json"] == load["invalid"] and load["transport_errors"] == 0
              and load["server_alive_after"] and load["server_idle_after"] and load["rss_back_to_start"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
