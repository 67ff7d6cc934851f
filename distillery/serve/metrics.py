"""The server's metrics in Prometheus' text format, written by hand (no extra dependency).

    distillery_request_count_total{route="/generate",status="200"} 12
    distillery_request_duration_seconds_bucket{route="/generate",le="0.1"} 9
    distillery_request_failure_total{reason="validation"} 3
    distillery_queue_size 0

Counters and histograms live in one `Metrics` object that the routes and the scheduler thread
update under a lock; gauges (queue size, batch size) are read from the scheduler when scraped.
The names follow TGI's (`tgi_request_count`, `tgi_request_queue_duration`, ...) with this
project's prefix and Prometheus' unit suffixes.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Callable

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)

HISTOGRAMS = {
    "distillery_request_duration_seconds": ("Time from a request's arrival to its last byte.", SECONDS),
    "distillery_request_queue_duration_seconds": ("Time a generation request waited before its prefill.", SECONDS),
    "distillery_time_to_first_token_seconds": ("Time from a generation request's arrival to its first token.",
                                               SECONDS),
    "distillery_time_per_output_token_seconds": ("Mean time between a request's generated tokens.", SECONDS),
    "distillery_request_input_tokens": ("Prompt length of generation requests, in tokens.", TOKENS),
    "distillery_request_generated_tokens": ("Tokens generated per request.", TOKENS),
    "distillery_batch_size": ("Rows in each decode step.", ROWS),
}
COUNTERS = {
    "distillery_request_count_total": "HTTP requests answered, by route and status code.",
    "distillery_request_failure_total": "Requests that failed, by reason (validation, overloaded, unauthorized, "
                                        "too_large, not_found, loading, generation, timeout, cancelled).",
    "distillery_decode_steps_total": "Decode steps run, by model.",
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        # name -> labels -> (bucket counts, sum, count)
        self._histograms: dict[str, dict[Labels, list]] = defaultdict(dict)
        self.gauges: dict[str, tuple[str, Callable[[], dict[Labels, float]]]] = {}

    # -- recording ------------------------------------------------------------------------------

    def count(self, name: str, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][_labels(labels)] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = HISTOGRAMS[name][1]
        with self._lock:
            entry = self._histograms[name].setdefault(_labels(labels), [[0] * len(buckets), 0.0, 0])
            for i, bound in enumerate(buckets):
                if value <= bound:
                    entry[0][i] += 1
            entry[1] += value
            entry[2] += 1

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.count("distillery_request_count_total", route=route, status=str(status))
        self.observe("distillery_request_duration_seconds", seconds, route=route)

    def count_failure(self, reason: str) -> None:
        self.count("distillery_request_failure_total", reason=reason)

    def observe_queue(self, model: str, seconds: float, input_tokens: int) -> None:
        self.observe("distillery_request_queue_duration_seconds", seconds, model=model)
        self.observe("distillery_request_input_tokens", input_tokens, model=model)

    def observe_step(self, model: str, rows: int) -> None:
        self.count("distillery_decode_steps_total", model=model)
        self.observe("distillery_batch_size", rows, model=model)

    def observe_generation(self, model: str, ttft: float | None, per_token: float | None, generated: int) -> None:
        if ttft is not None:
            self.observe("distillery_time_to_first_token_seconds", ttft, model=model)
        if per_token is not None:
            self.observe("distillery_time_per_output_token_seconds", per_token, model=model)
        self.observe("distillery_request_generated_tokens", generated, model=model)

    # -- the text format ------------------------------------------------------------------------

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, help_text in COUNTERS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                lines += [f"{name}{_format(labels)} {_number(v)}" for labels, v in sorted(self._counters[name].items())]
            for name, (help_text, buckets) in HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                for labels, (counts, total, count) in sorted(self._histograms[name].items()):
                    for bound, n in zip(buckets, counts):
                        lines.append(f"{name}_bucket{_format(labels + (('le', _number(bound)),))} {n}")
                    lines.append(f"{name}_bucket{_format(labels + (('le', '+Inf'),))} {count}")
                    lines.append(f"{name}_sum{_format(labels)} {_number(total)}")
                    lines.append(f"{name}_count{_format(labels)} {count}")
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_format(labels)} {_number(v)}" for labels, v in sorted(read().items())]
        return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _format(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
