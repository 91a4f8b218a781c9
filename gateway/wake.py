"""Scale from zero: a request for a LocalModel with no ready replica that may scale to zero
(`spec.scaling.minReplicas: 0`) asks for one replica and is held until it serves the model.

- Asking: through the LocalModel's `scale` subresource, `spec.replicas` 0 -> 1 (with the resourceVersion read,
  so a concurrent change wins), the same thing `kubectl scale` does. The operator's autoscaler accepts the count
  and keeps it for at least `scaleDownDelay`. The gateway's RBAC needs `get` and `patch` on `localmodels/scale`
  only: it cannot touch anything else in the spec.
- One ask per model at a time, whatever the number of requests waiting (they share it); asked again every
  `REASK_SECONDS` while requests still wait, in case the count went back to zero meanwhile.
- Held until the LocalModel has a ready pod and the operator reports the model loaded (status.readyReplicas
  >= 1). The pods' readiness gate (lmkube.dev/model-loaded) already keeps a pod un-Ready until the operator has
  loaded the model in it; status.readyReplicas also covers pods of an operator from before the gate, which are
  Ready as soon as their server listens (a request sent then would load the model on its own and be cut off by
  the operator's load).
- Streaming clients (`"stream": true`) get the response's headers at once and an SSE comment line,
  `: waiting for replica`, every `COMMENT_SECONDS`, which keeps proxies and SDKs from timing out; the
  replica's answer then continues the same stream. Past the bound (`--scale-from-zero-seconds`): 503 (529 for
  Anthropic) with `Retry-After` in the family's shape, or, once a stream has begun, the family's error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import orjson
from lmkube.operator import crd

from .catalog import Catalog, ServedModel
from .errors import ANTHROPIC_OVERLOADED, GatewayError, family, stream_error_event
from .proxy import Message, Send

log = logging.getLogger("lmkube.gateway")

DEFAULT_HOLD_SECONDS = 300.0
COMMENT_SECONDS = 5.0
REASK_SECONDS = 10.0
POLL_SECONDS = 0.1
RETRY_AFTER = "10"
WAITING_COMMENT = b": waiting for replica\n\n"

# request_replica(model) -> True when it raised spec.replicas from 0 (False: it was not at zero any more).
RequestReplica = Callable[[ServedModel], Awaitable[bool]]


def serving(model: ServedModel | None) -> bool:
    return model is not None and bool(model.replicas) and model.serving > 0


@dataclass
class Held:
    """The outcome of holding a request: the model, now served (and the `send` to answer with), or the status
    already answered (499: the client left; 503: the bound passed on a stream that had begun)."""

    model: ServedModel | None
    send: Send
    status: int = 0


class Waker:
    def __init__(self, catalog: Catalog, request_replica: RequestReplica,
                 hold_seconds: float = DEFAULT_HOLD_SECONDS) -> None:
        self.catalog = catalog
        self.request_replica = request_replica
        self.hold_seconds = hold_seconds
        self._asks: dict[str, asyncio.Task[bool]] = {}
        self.scale_ups: Counter[str] = Counter()  # times this gateway raised a model from zero
        self.waiting: Counter[str] = Counter()

    def applies(self, model: ServedModel) -> bool:
        """Whether a request for `model`, which no ready replica serves now, is held."""
        return self.hold_seconds > 0 and model.scales_from_zero and not serving(model)

    def _ask(self, model: ServedModel) -> asyncio.Task[bool]:
        task = self._asks.get(model.id)
        if task is None or task.done():
            task = self._asks[model.id] = asyncio.create_task(self._request(model))
        return task

    async def _request(self, model: ServedModel) -> bool:
        try:
            raised = await self.request_replica(model)
        except Exception as exc:  # the API server unreachable, RBAC missing: the request waits and asks again
            log.warning("asking for a replica of %s failed: %s", model.id, exc)
            return False
        if raised:
            self.scale_ups[model.id] += 1
            log.info("%s was scaled to zero: asked for one replica", model.id)
        return raised

    async def hold(self, model: ServedModel, path: str, streaming: bool, gone: asyncio.Future[None],
                   send: Send) -> Held:
        """Waits for a replica of `model` (see the module's docstring); raises GatewayError past the bound
        when nothing has been sent yet."""
        began = time.monotonic()
        deadline = began + self.hold_seconds
        self.waiting[model.id] += 1
        try:
            stream = HeldStream(path, send) if streaming else None
            if stream is not None:
                await stream.start()
            asked_at = -REASK_SECONDS
            commented_at = began
            while True:
                now = time.monotonic()
                current = self.catalog.models.get(model.id)
                if serving(current):
                    assert current is not None
                    log.info("%s: a held request goes on after %.1f s", model.id, now - began)
                    return Held(current, stream.send if stream is not None else send)
                if gone.done():
                    return Held(None, send, 499)
                if now >= deadline or current is None:
                    break
                if now - asked_at >= REASK_SECONDS:
                    self._ask(current)
                    asked_at = now
                if stream is not None and now - commented_at >= COMMENT_SECONDS:
                    await stream.comment()
                    commented_at = now
                await asyncio.wait({gone}, timeout=POLL_SECONDS)
        finally:
            self.waiting[model.id] -= 1
        message = (f"The model '{model.id}' is scaled to zero and no replica became ready within "
                   f"{self.hold_seconds:g} s. Retry shortly.")
        if stream is not None:
            await stream.fail(message)
            return Held(None, send, 503)
        status = ANTHROPIC_OVERLOADED if family(path) == "anthropic" else 503
        raise GatewayError(status, message, type="server_error", code="model_not_running",
                           headers={"Retry-After": RETRY_AFTER})

    def render(self) -> str:
        lines = ["# HELP lmkube_gateway_scale_from_zero_total Times this gateway asked for a replica of a LocalModel "
                 "at zero.", "# TYPE lmkube_gateway_scale_from_zero_total counter"]
        lines += [f'lmkube_gateway_scale_from_zero_total{{model="{m}"}} {n}' for m, n in self.scale_ups.items()]
        lines += ["# HELP lmkube_gateway_requests_waiting_for_replica Requests held until a replica is ready.",
                  "# TYPE lmkube_gateway_requests_waiting_for_replica gauge"]
        lines += [f'lmkube_gateway_requests_waiting_for_replica{{model="{m}"}} {n}' for m, n in self.waiting.items()]
        return "\n".join(lines) + "\n"


class HeldStream:
    """A streamed answer begun before any replica answered: the replica's answer continues it."""

    def __init__(self, path: str, send: Send) -> None:
        self.path = path
        self._send = send
        self._failed: bytearray | None = None  # the body of a replica's error answer, turned into an event

    async def start(self) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.comment()

    async def comment(self) -> None:
        await self._send({"type": "http.response.body", "body": WAITING_COMMENT, "more_body": True})

    async def fail(self, message: str) -> None:
        await self._send({"type": "http.response.body", "body": stream_error_event(self.path, message),
                          "more_body": False})

    async def send(self, message: Message) -> None:
        """The replica's answer, as the proxy passes it on: its start is dropped (ours went out); an error answer
        (not a stream) becomes the family's error event."""
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self._failed = bytearray()
            return
        if self._failed is None:
            await self._send(message)
            return
        self._failed += message.get("body", b"")
        if not message.get("more_body", False):
            await self.fail(_error_message(bytes(self._failed)))


def _error_message(body: bytes) -> str:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace")[:500] or "the replica refused the request"
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return "the replica refused the request"


class ScaleSubresource:
    """Asks through the Kubernetes API: the LocalModel's `scale` subresource, from 0 to 1."""

    def __init__(self, client: httpx.AsyncClient, server: str, token: Callable[[], str | None]) -> None:
        self.client = client
        self.server = server
        self.token = token

    def _url(self, model: ServedModel) -> str:
        return (f"{self.server}/apis/{crd.GROUP}/{crd.VERSION}/namespaces/{model.namespace}/{crd.PLURAL}/"
                f"{model.name}/scale")

    def _headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def __call__(self, model: ServedModel) -> bool:
        current = await self.client.get(self._url(model), headers=self._headers())
        current.raise_for_status()
        scale = current.json()
        if (scale.get("spec") or {}).get("replicas", 0) > 0:
            return False  # already asked for (another gateway replica, the autoscaler, a person)
        patch = {"metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]}, "spec": {"replicas": 1}}
        answer = await self.client.patch(self._url(model), content=orjson.dumps(patch),
                                         headers={**self._headers(), "Content-Type": "application/merge-patch+json"})
        if answer.status_code == 409:
            return False  # changed since it was read: the next ask reads it again
        answer.raise_for_status()
        return True
