"""The in-process log event bus behind `GET /api/v1/logs/stream` (what `lmkube log stream` shows).

Two sources, with LM Studio's `DiagnosticsLogEvent` shapes (`{"timestamp": ms, "data": {...}}`):
- `server`: one `server.log` line per finished HTTP request (method, path, status, duration), and one per
  line a stdio MCP server writes to its stderr (`mcp/stderr_log.py`);
- `model`: `llm.prediction.input` (the rendered prompt) when a generation is submitted and
  `llm.prediction.output` (the generated text, with stats) when it ends.

Everything runs on the event loop thread. Nothing is rendered, detokenized or wrapped unless the
source has a subscriber, so the bus costs one set lookup per request when nobody listens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from .engine.events import Event, EventStream, Finish, TextDelta
from .request_observer import FinishedRequest

if TYPE_CHECKING:
    from .engine.slot import GenerationRequest
    from .runtime.instance import ModelInstance

Source = Literal["server", "model"]
SOURCES: tuple[Source, ...] = ("server", "model")
_QUEUE_LIMIT = 1000  # events a slow subscriber may fall behind by before newer ones are dropped for it


class LogBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {s: set() for s in SOURCES}

    def active(self, source: Source) -> bool:
        return bool(self._subscribers[source])

    def publish(self, source: Source, data: dict[str, Any]) -> None:
        subscribers = self._subscribers[source]
        if not subscribers:
            return
        event = {"timestamp": int(time.time() * 1000), "data": data}
        for queue in subscribers:
            if queue.qsize() < _QUEUE_LIMIT:
                queue.put_nowait(event)

    @contextmanager
    def subscribe(self, source: Source) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers[source].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[source].discard(queue)


BUS = LogBus()


def log_request(request: FinishedRequest, bus: LogBus = BUS) -> None:
    """A `server.log` event per finished HTTP request (a request observer, see request_observer.py)."""
    if bus.active("server"):
        ms = request.seconds * 1000
        bus.publish("server", {
            "type": "server.log", "level": "error" if request.status >= 500 else "info",
            "content": f"{request.method} {request.path} {request.status} {ms:.1f} ms",
            "method": request.method, "path": request.path, "status": request.status, "duration_ms": round(ms, 2),
        })


_STOP_REASONS = {"length": "maxPredictedTokensReached", "cancelled": "userStopped", "error": "failed"}


def prediction_stats(finish: Finish, total_seconds: float) -> dict[str, Any]:
    """The SDK's LLMPredictionStats (camelCase) from the engine's closing event."""
    reason = _STOP_REASONS.get(finish.reason) or ("stopStringFound" if finish.stop_sequence else "eosFound")
    stats: dict[str, Any] = {
        "stopReason": reason,
        "tokensPerSecond": round(finish.tokens_per_second, 3),
        "timeToFirstTokenSec": None if finish.time_to_first_token is None else round(finish.time_to_first_token, 4),
        "totalTimeSec": round(total_seconds, 4),
        "promptTokensCount": finish.prompt_tokens,
        "predictedTokensCount": finish.completion_tokens,
        "totalTokensCount": finish.prompt_tokens + finish.completion_tokens,
    }
    if finish.stop_sequence:
        stats["stopString"] = finish.stop_sequence
    return stats


class LoggedGeneration:
    """A GenerationRequest seen through the model log: same iteration and cancel, plus an output event
    when it ends (finished, failed or abandoned by its consumer)."""

    __slots__ = ("_bus", "_identifier", "_parts", "_published", "_stream", "request")

    def __init__(self, request: GenerationRequest, identifier: str, bus: LogBus) -> None:
        self.request = request
        self._stream: EventStream = request.events
        self._bus = bus
        self._identifier = identifier
        self._parts: list[str] = []
        self._published = False

    def __getattr__(self, name: str) -> Any:  # prompt, params, submitted_at, ... of the real request
        return getattr(self.request, name)

    def __aiter__(self) -> LoggedGeneration:
        return self

    async def __anext__(self) -> list[Event]:
        events = await self._stream.__anext__()
        for event in events:
            if isinstance(event, TextDelta):
                self._parts.append(event.text)
            elif isinstance(event, Finish):
                self._publish(event)
        return events

    def cancel(self) -> None:
        self.request.cancel()
        if not self._published:
            self._publish(None)

    def _publish(self, finish: Finish | None) -> None:
        self._published = True
        data: dict[str, Any] = {"type": "llm.prediction.output", "output": "".join(self._parts),
                                "modelIdentifier": self._identifier}
        total = time.perf_counter() - self.request.submitted_at
        data["stats"] = prediction_stats(finish, total) if finish is not None else {
            "stopReason": "userStopped", "totalTimeSec": round(total, 4)}
        self._bus.publish("model", data)


def observe(instance: ModelInstance, request: GenerationRequest, bus: LogBus = BUS) -> GenerationRequest:
    """The request as its API layer should consume it: wrapped (and its prompt published) only while
    someone streams the model log."""
    if not bus.active("model"):
        return request
    bus.publish("model", {"type": "llm.prediction.input",
                          "input": instance.model.detokenize(request.prompt, special=True),
                          "modelPath": instance.variant.key, "modelIdentifier": instance.id})
    # It stands in for the request where the API layers use one: iterating it, cancel(), params.
    return LoggedGeneration(request, instance.id, bus)  # type: ignore[return-value]  # same interface
