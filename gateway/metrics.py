"""The gateway's own Prometheus metrics (text format 0.0.4), kept in plain dicts: one process, one event
loop, so no locks. `model` is the LocalModel's `namespace/name`; `key` is the key's name, never the key."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .catalog import ServedModel

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


class Histogram:
    def __init__(self) -> None:
        self.counts: defaultdict[Labels, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: defaultdict[Labels, float] = defaultdict(float)

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts[labels]
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                counts[index] += 1
        counts[-1] += 1
        self.sums[labels] += value

    def render(self, name: str) -> Iterable[str]:
        for labels, counts in self.counts.items():
            for bound, count in zip((*BUCKETS, "+Inf"), counts, strict=True):
                yield f"{name}_bucket{_labels((*labels, ('le', str(bound))))} {count}"
            yield f"{name}_sum{_labels(labels)} {self.sums[labels]}"
            yield f"{name}_count{_labels(labels)} {counts[-1]}"


class GatewayMetrics:
    def __init__(self) -> None:
        self.requests: defaultdict[Labels, int] = defaultdict(int)
        self.upstream_errors: defaultdict[Labels, int] = defaultdict(int)
        self.in_flight: defaultdict[Labels, int] = defaultdict(int)
        self.duration = Histogram()
        self.first_byte = Histogram()

    def finished(self, model: str, key: str, code: int, seconds: float) -> None:
        self.requests[(("model", model), ("key", key), ("code", str(code)))] += 1
        self.duration.observe((("model", model),), seconds)

    def upstream_error(self, model: str, key: str, reason: str) -> None:
        self.upstream_errors[(("model", model), ("key", key), ("reason", reason))] += 1

    def render(self, models: Iterable[ServedModel]) -> str:
        lines = ["# HELP lmkube_gateway_requests_total Requests answered, by LocalModel, key name and status code.",
                 "# TYPE lmkube_gateway_requests_total counter"]
        lines += [f"lmkube_gateway_requests_total{_labels(k)} {v}" for k, v in self.requests.items()]
        lines += ["# HELP lmkube_gateway_upstream_errors_total Replicas that refused, failed or died mid-response.",
                  "# TYPE lmkube_gateway_upstream_errors_total counter"]
        lines += [f"lmkube_gateway_upstream_errors_total{_labels(k)} {v}" for k, v in self.upstream_errors.items()]
        lines += ["# HELP lmkube_gateway_requests_in_flight Requests being proxied now.",
                  "# TYPE lmkube_gateway_requests_in_flight gauge"]
        lines += [f"lmkube_gateway_requests_in_flight{_labels(k)} {v}" for k, v in self.in_flight.items()]
        lines += ["# HELP lmkube_gateway_request_duration_seconds Time from request to the last byte of the answer.",
                  "# TYPE lmkube_gateway_request_duration_seconds histogram", *self.duration.render(
                      "lmkube_gateway_request_duration_seconds")]
        lines += ["# HELP lmkube_gateway_time_to_first_byte_seconds Time from request to the replica's first byte.",
                  "# TYPE lmkube_gateway_time_to_first_byte_seconds histogram", *self.first_byte.render(
                      "lmkube_gateway_time_to_first_byte_seconds")]
        lines += ["# HELP lmkube_gateway_ready_replicas Ready replicas per LocalModel, as discovered.",
                  "# TYPE lmkube_gateway_ready_replicas gauge"]
        lines += [f"lmkube_gateway_ready_replicas{_labels((('model', m.id),))} {len(m.replicas)}" for m in models]
        return "\n".join(lines) + "\n"
