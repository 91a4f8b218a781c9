"""Prometheus text exposition (format 0.0.4) for GET /metrics, and the HTTP request observer that feeds it.

Per model: llama.cpp server's `llamacpp:*` families (same names, HELP texts and meanings, so dashboards
made for llama-server work), labelled `model="<instance id>"`. Two deviations, both toward correct
Prometheus types: `n_busy_slots_per_decode` and `n_tokens_max` are gauges (llama-server declares them
counters although they are a mean and a maximum), and the `*_tokens_seconds` throughputs average over
the instance's lifetime rather than since the previous scrape (llama-server resets them on every scrape,
which breaks as soon as two scrapers poll). Per HTTP route: `lmkube_http_requests_total` and the
`lmkube_http_request_duration_seconds` histogram by method, route template and status. lmkube's own
per-model extras: `lmkube_requests_rejected_total`, `lmkube_instance_max_queue`, `lmkube_host_cache_tokens`,
`lmkube_host_cache_budget_bytes`, speculative decoding's
`lmkube_draft_tokens_total{outcome="accepted|rejected|ignored"}`, and vision's `lmkube_images_evaluated_total`,
`lmkube_image_encode_seconds_total` and `lmkube_image_seconds_total`.
The Gateway API Inference Extension's gauges under vLLM's names (`vllm:*`) are in gie_metrics.py.

Hot path cost: the engines bump plain attributes once per decode call or finished request
(engine/stats.py); the request observer does one dict update and one bisect per HTTP request, on the event
loop thread, so nothing here needs a lock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .engine.generation import GenerationEngine
from .engine.stats import EngineStats
from .gie_metrics import write_gie_gauges
from .request_observer import FinishedRequest
from .runtime.manager import ModelManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus' default buckets, stretched to the minutes a long generation can take.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

Labels = tuple[tuple[str, str], ...]
DRAFT_OUTCOMES = ("accepted", "rejected", "ignored")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


class Exposition:
    """Accumulates metric families as text; each family is written once with its HELP and TYPE."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        self._lines.append(f"# HELP {name} {_escape(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        self._lines.extend(f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples)

    def histogram(self, name: str, help_text: str, series: dict[Labels, _Histogram]) -> None:
        self._lines.append(f"# HELP {name} {_escape(help_text)}")
        self._lines.append(f"# TYPE {name} histogram")
        for labels, hist in series.items():
            cumulative = 0
            for bound, count in zip((*DURATION_BUCKETS, math.inf), hist.counts, strict=True):
                cumulative += count
                le = "+Inf" if math.isinf(bound) else repr(bound)
                self._lines.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {cumulative}")
            self._lines.append(f"{name}_sum{_labels(labels)} {_number(hist.total)}")
            self._lines.append(f"{name}_count{_labels(labels)} {hist.count}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


@dataclass(slots=True)
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0


class HttpMetrics:
    """Request counts and latencies by (method, route template, status); touched only on the event loop."""

    def __init__(self) -> None:
        self.requests: dict[Labels, int] = {}
        self.durations: dict[Labels, _Histogram] = {}

    def observe(self, request: FinishedRequest) -> None:
        seconds = request.seconds
        labels = (("method", request.method), ("route", request.route), ("status", str(request.status)))
        self.requests[labels] = self.requests.get(labels, 0) + 1
        hist = self.durations.get(labels)
        if hist is None:
            hist = self.durations[labels] = _Histogram()
        hist.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        hist.total += seconds
        hist.count += 1

    def write(self, out: Exposition) -> None:
        out.family("lmkube_http_requests_total", "counter", "HTTP requests answered, by method, route and status.",
                   self.requests.items())
        out.histogram("lmkube_http_request_duration_seconds",
                      "Time from receiving an HTTP request to the end of its response (streams included).",
                      self.durations)


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def write_model_metrics(out: Exposition, manager: ModelManager) -> None:
    """llama.cpp's families for every instance id served so far (gauges only for the loaded ones)."""
    every: list[tuple[Labels, EngineStats]] = [((("model", name),), stats) for name, stats in manager.stats.items()]
    loaded = [((("model", i.id),), i) for i in manager.loaded()]

    def counter(name: str, help_text: str, value: str) -> None:
        out.family(f"llamacpp:{name}", "counter", help_text, ((labels, getattr(s, value)) for labels, s in every))

    counter("prompt_tokens_total", "Number of prompt tokens processed.", "prompt_tokens")
    counter("prompt_seconds_total", "Prompt process time", "prompt_seconds")
    counter("tokens_predicted_total", "Number of generation tokens processed.", "predicted_tokens")
    counter("tokens_predicted_seconds_total", "Predict process time", "predicted_seconds")
    counter("n_decode_total", "Total number of llama_decode() calls", "decode_calls")
    out.family("llamacpp:n_tokens_max", "gauge", "Largest observed n_tokens.",
               ((labels, s.n_tokens_max) for labels, s in every))
    out.family("llamacpp:n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call",
               ((labels, s.busy_slots / s.decode_calls if s.decode_calls else 0.0) for labels, s in every))
    out.family("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
               ((labels, _rate(s.prompt_tokens, s.prompt_seconds)) for labels, s in every))
    out.family("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
               ((labels, _rate(s.predicted_tokens, s.predicted_seconds)) for labels, s in every))
    kv = [(labels, i.engine) for labels, i in loaded if isinstance(i.engine, GenerationEngine)]
    out.family("llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               ((labels, engine.kv_cache_tokens / engine.n_ctx) for labels, engine in kv))
    out.family("llamacpp:kv_cache_tokens", "gauge", "KV-cache tokens.",
               ((labels, engine.kv_cache_tokens) for labels, engine in kv))
    out.family("lmkube_host_cache_tokens", "gauge",
               "Tokens of finished requests' prompt caches parked in host memory (--cache-ram).",
               ((labels, engine.host_cache_tokens) for labels, engine in kv))
    out.family("lmkube_host_cache_budget_bytes", "gauge",
               "The most host memory those caches may take: --cache-ram, at most half of what a memory limit "
               "left after the load.", ((labels, engine.host_cache_budget_bytes) for labels, engine in kv))
    out.family("llamacpp:requests_processing", "gauge", "Number of requests processing.",
               ((labels, i.engine.active) for labels, i in loaded))
    out.family("llamacpp:requests_deferred", "gauge", "Number of requests deferred.",
               ((labels, i.engine.queued) for labels, i in loaded))
    out.family("lmkube_requests_rejected_total", "counter",
               "Requests refused with 503/529 because the instance's queue was full (--max-queue).",
               ((labels, s.rejected) for labels, s in every))
    out.family("lmkube_draft_tokens_total", "counter",
               "Speculative decoding: tokens a draft model proposed and the model verified, by outcome (accepted; "
               "rejected: the first mismatch of a round; ignored: drafted after it or past the end).",
               ((((*labels, ("outcome", outcome)), getattr(s, f"draft_{outcome}")) for labels, s in every
                 for outcome in DRAFT_OUTCOMES)))
    out.family("lmkube_images_evaluated_total", "counter",
               "Images encoded by the vision projector and decoded into a sequence (cached ones are not).",
               ((labels, s.images_evaluated) for labels, s in every))
    out.family("lmkube_image_encode_seconds_total", "counter",
               "Time spent encoding images (vision encoder and projector), beside the engine's steps.",
               ((labels, s.image_encode_seconds) for labels, s in every))
    out.family("lmkube_image_seconds_total", "counter",
               "Engine time spent decoding images into sequences, during which no other request advanced.",
               ((labels, s.image_seconds) for labels, s in every))
    out.family("lmkube_instance_max_queue", "gauge",
               "Requests an instance queues beyond its running ones (-1: unbounded).",
               ((labels, -1 if i.engine.max_queue is None else i.engine.max_queue) for labels, i in loaded))


def render(manager: ModelManager, http: HttpMetrics) -> str:
    out = Exposition()
    write_model_metrics(out, manager)
    write_gie_gauges(out, manager)
    http.write(out)
    return out.text()
