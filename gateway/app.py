"""The gateway's ASGI app: authenticate, find the model, pick a replica, proxy, count.

A raw ASGI app rather than a framework's router: every byte of every answer passes through here, and the
few routes the gateway answers itself (`/health`, `/metrics`, the model lists) need no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson
from starlette.responses import Response

from . import errors, routes, stored
from .balance import Balancer
from .catalog import Catalog, Replica, ServedModel
from .errors import GatewayError, family
from .keys import Grant, KeyRing, presented_key
from .limits import ConcurrencyLimiter
from .metrics import GatewayMetrics
from .proxy import Proxy, Receive, Scope, Send, UpstreamDied, client_gone
from .resolve import resolve, upstream_model
from .upstream import UpstreamPool, UpstreamResponse, UpstreamUnreachable
from .wake import Waker

log = logging.getLogger("lmkube.gateway")

OPEN_GRANT = Grant(name="anonymous", models=frozenset({"*"}), namespaces=frozenset())
RESPONSE_OWNERS = 65536  # response id -> replica, for `previous_response_id` (most recent kept)


class Discovery(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass
class GatewaySettings:
    upstream_token: str | None = None  # the credential every pod accepts (clients never see it)
    open_access: bool = False  # no keys: everyone may use every model (local use only)
    max_body_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 5.0
    read_timeout: float | None = None  # a long prompt may take minutes before its first token


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


class Gateway:
    def __init__(self, catalog: Catalog, keys: KeyRing, settings: GatewaySettings,
                 discoveries: list[Discovery] | None = None) -> None:
        self.catalog = catalog
        self.keys = keys
        self.settings = settings
        self.discoveries = discoveries or []
        self.balancer = Balancer()
        self.limiter = ConcurrencyLimiter()
        self.metrics = GatewayMetrics()
        self.owners: OrderedDict[str, str] = OrderedDict()
        self.client: httpx.AsyncClient | None = None  # the rare calls: model lists, stored responses
        self.pool: UpstreamPool | None = None  # inference, relayed
        self.proxy: Proxy | None = None
        self.waker: Waker | None = None  # scale from zero (Kubernetes discovery only)

    # -- lifespan ------------------------------------------------------------------------------------

    async def startup(self) -> None:
        timeout = httpx.Timeout(connect=self.settings.connect_timeout, read=self.settings.read_timeout,
                                write=60, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)
        self.pool = UpstreamPool(connect_timeout=self.settings.connect_timeout)
        self.proxy = Proxy(self.pool, self.settings.upstream_token)
        for discovery in self.discoveries:
            await discovery.start()

    async def shutdown(self) -> None:
        for discovery in self.discoveries:
            await discovery.stop()
        if self.client is not None:
            await self.client.aclose()
        if self.pool is not None:
            await self.pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self.startup()
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        raise
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # -- requests ------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/health":
            ready = self.catalog.synced
            return await _json(200 if ready else 503, {"status": "ok" if ready else "starting"})(scope, receive, send)
        if path == "/metrics":
            text = self.metrics.render(self.catalog.models.values()) + (self.waker.render() if self.waker else "")
            return await Response(text, media_type="text/plain; version=0.0.4")(scope, receive, send)
        try:
            grant = self._authorize(scope)
            response = await self._route(scope, receive, send, grant)
        except GatewayError as error:
            response = errors.error_response(path, error)
        if response is not None:
            await response(scope, receive, send)

    def _authorize(self, scope: Scope) -> Grant:
        if self.settings.open_access:
            return OPEN_GRANT
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                   if k in (b"authorization", b"x-api-key")}
        key = presented_key(headers)
        grant = self.keys.lookup(key) if key else None
        if grant is not None:
            return grant
        match family(scope["path"]), key:
            case "anthropic", None:
                message = "x-api-key header is required"
            case "anthropic", _:
                message = "invalid x-api-key"
            case _, None:
                message = ("You didn't provide an API key. Send the gateway key as 'Authorization: Bearer <key>' "
                           "(or 'x-api-key: <key>').")
            case _:
                message = "Incorrect API key provided. Ask the cluster's administrator for a gateway key."
        kind = "authentication_error" if family(scope["path"]) == "anthropic" else "invalid_request_error"
        raise GatewayError(401, message, type=kind, code="invalid_api_key")

    def _visible(self, grant: Grant) -> list[ServedModel]:
        return sorted((m for m in self.catalog.models.values() if grant.allows(m)), key=lambda m: m.id)

    async def _route(self, scope: Scope, receive: Receive, send: Send, grant: Grant) -> Response | None:
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in routes.LIST_ROUTES:
            return await self._model_list(path, grant)
        if method == "GET" and (requested := routes.model_from_path(path)) is not None:
            return await self._model_info(scope, receive, send, requested, grant)
        if path in routes.MANAGEMENT_ROUTES:
            raise GatewayError(403, "Models are loaded, unloaded and downloaded by the lmkube operator "
                               "(the LocalModel's spec), not through the gateway.", code="managed_by_operator")
        if method == "POST" and path in routes.BODY_MODEL_ROUTES:
            await self._inference(scope, receive, send, grant)
            return None
        if (stored_id := stored.response_id(method, path)) is not None:
            return await self._stored_response(scope, stored_id, grant)
        raise GatewayError(404, f"Unexpected endpoint or method. ({method} {path})", code="unknown_route")

    def _find(self, requested: str, grant: Grant, path: str, *, hide: bool) -> ServedModel:
        """The model, or 404 (no such model; also any the key may not see when `hide`), or 403."""
        found = resolve(requested, self.catalog.models.values(), grant.allows)
        visible = [m for m in found if grant.allows(m)]
        if len(visible) == 1:
            return visible[0]
        if len(visible) > 1:
            raise GatewayError(400, f"'{requested}' names several models: "
                               f"{', '.join(sorted(m.id for m in visible))}. Use namespace/name.",
                               code="model_ambiguous", param="model")
        if found and not hide:
            kind = "permission_error" if family(path) == "anthropic" else "invalid_request_error"
            raise GatewayError(403, f"This key may not use the model '{requested}'.", type=kind,
                               code="model_not_allowed", param="model")
        raise errors.model_not_found(path, requested)

    async def _model_list(self, path: str, grant: Grant) -> Response:
        visible = self._visible(grant)
        if path == "/v1/models":
            return _json(200, routes.openai_list(visible))
        assert self.client is not None
        picks = {m.id: (r.url if (r := self.balancer.pick(m.replicas)) else None) for m in visible}
        return _json(200, await routes.native_list(self.client, visible, path, self._upstream_auth(), picks))

    async def _stored_response(self, scope: Scope, stored_id: str, grant: Grant) -> Response:
        assert self.client is not None
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        urls = stored.candidates(self._visible(grant), self.owners.get(stored_id))
        answer = await stored.find(self.client, urls, scope["method"], target, self._upstream_auth())
        if answer is None:
            raise GatewayError(404, f"Response with id '{stored_id}' not found.", code="not_found")
        if scope["method"] == "DELETE" and answer.status_code == 200:
            self.owners.pop(stored_id, None)
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type", "application/json"))

    def _upstream_auth(self) -> dict[str, str]:
        token = self.settings.upstream_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _model_info(self, scope: Scope, receive: Receive, send: Send, requested: str,
                          grant: Grant) -> Response | None:
        path = scope["path"]
        model = self._find(requested, grant, path, hide=True)
        listed = routes.listed_names(self._visible(grant))[model.id]
        if path.startswith("/v1/"):
            return _json(200, routes.openai_model(listed))
        replica = self.balancer.pick(model.replicas)
        if replica is None or model.model_key is None:
            return _json(200, routes.legacy_stub(model, listed))
        assert self.client is not None
        try:
            answer = await self.client.get(f"{replica.url}/api/v0/models/{model.model_key}",
                                           headers=self._upstream_auth(), timeout=5)
            answer.raise_for_status()
            return _json(200, {**answer.json(), "id": listed})
        except (httpx.HTTPError, ValueError):
            return _json(200, routes.legacy_stub(model, listed))

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise GatewayError(499, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise GatewayError(413, f"Request body exceeds {self.settings.max_body_bytes} bytes.",
                                   code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _inference(self, scope: Scope, receive: Receive, send: Send, grant: Grant) -> None:
        path = scope["path"]
        raw = await self._read_body(receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise GatewayError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
        requested = body.get("model") if isinstance(body, dict) else None
        if not isinstance(requested, str) or not requested.strip():
            raise GatewayError(400, "you must provide a model parameter", param="model", code="missing_model")
        model = self._find(requested, grant, path, hide=False)
        target = upstream_model(requested, model)
        if target != requested:
            raw = orjson.dumps({**body, "model": target})
        if not self.limiter.try_acquire(grant):
            kind = "rate_limit_error" if family(path) == "anthropic" else "requests"
            raise GatewayError(429, f"This key already has {grant.max_concurrency} requests in flight, its limit. "
                               "Retry when one has finished.", type=kind, code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
        labels = (("model", model.id),)
        self.metrics.in_flight[labels] += 1
        began = time.monotonic()
        status = 499
        gone = client_gone(receive)
        try:
            status = await self._forward(scope, gone, send, model, grant, body, raw)
        except GatewayError as error:
            status = error.status
            raise
        finally:
            gone.cancel()
            self.metrics.in_flight[labels] -= 1
            self.limiter.release(grant)
            self.metrics.finished(model.id, grant.name, status, time.monotonic() - began)

    def _pinned(self, model: ServedModel, body: dict[str, Any]) -> Replica | None:
        previous = body.get("previous_response_id")
        url = self.owners.get(previous) if isinstance(previous, str) else None
        return next((r for r in model.replicas if r.url == url), None)

    def _recorder(self, path: str, replica: Replica) -> Callable[[bytes], None] | None:
        if path not in routes.RESPONSE_ID_ROUTES:
            return None
        seen: set[bytes] = set()

        def record(chunk: bytes) -> None:
            for match in routes.RESPONSE_ID.finditer(chunk):
                if match.group() not in seen:
                    seen.add(match.group())
                    self.owners[match.group().decode()] = replica.url
                    if len(self.owners) > RESPONSE_OWNERS:
                        self.owners.popitem(last=False)
        return record

    async def _forward(self, scope: Scope, gone: asyncio.Future[None], send: Send, model: ServedModel,
                       grant: Grant, body: dict[str, Any], raw: bytes) -> int:
        """Tries replicas until one answers; returns the status passed on (499: the client went away first)."""
        assert self.proxy is not None
        path = scope["path"]
        affinity = routes.affinity_key(body)
        continues = isinstance(body.get("previous_response_id"), str)
        tried: set[str] = set()
        while True:
            # Held while the model is coming back from zero, even once a pod is Ready: until the operator has
            # loaded the model there, a request would load it on its own and the operator's load cut it off.
            if not tried and self.waker is not None and self.waker.applies(model):
                held = await self.waker.hold(model, path, body.get("stream") is True, gone, send)
                if held.model is None:
                    return held.status
                model, send = held.model, held.send
                continue
            pinned = self._pinned(model, body) if not tried else None
            replica = pinned or self.balancer.pick(model.replicas, affinity, frozenset(tried))
            if replica is None:
                if tried:
                    raise GatewayError(502, f"No replica of the model '{model.id}' could be reached.",
                                       type="server_error", code="upstream_unreachable")
                status = errors.ANTHROPIC_OVERLOADED if family(path) == "anthropic" else 503
                raise GatewayError(status, f"The model '{model.id}' has no ready replica. Retry shortly.",
                                   type="server_error", code="model_not_running", headers={"Retry-After": "5"})
            tried.add(replica.url)
            self.balancer.acquire(replica.url)
            try:
                began = time.monotonic()
                opening = asyncio.ensure_future(self.proxy.open(replica, scope, raw))
                await asyncio.wait((opening, gone), return_when=asyncio.FIRST_COMPLETED)
                if not opening.done():  # the client left before the answer began: so does the request
                    opening.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await opening
                    return 499
                try:
                    upstream = opening.result()
                except UpstreamUnreachable as exc:
                    # Nothing came back, so nothing was generated for the client: another replica may answer.
                    log.warning("replica %s of %s unreachable: %s", replica.name, model.id, exc)
                    self.balancer.eject(replica.url)
                    self.metrics.upstream_error(model.id, grant.name, "connect")
                    continue
                self.metrics.first_byte.observe((("model", model.id),), time.monotonic() - began)
                if continues and upstream.status in (400, 404) and len(tried) < len(model.replicas):
                    try:
                        content = await upstream.aread()
                    finally:
                        await upstream.aclose()
                    if b"previous_response_not_found" in content:
                        continue  # stored on another replica (another gateway replica routed the first turn)
                    await self._send_buffered(upstream, content, replica, send)
                    return upstream.status
                try:
                    if not await self.proxy.relay(upstream, replica, scope, gone, send, self._recorder(path, replica)):
                        return 499
                except UpstreamDied as exc:
                    log.warning("replica %s of %s died mid-answer: %s", replica.name, model.id, exc)
                    self.balancer.eject(replica.url)
                    self.metrics.upstream_error(model.id, grant.name, "died")
                    if not exc.answered:
                        raise
                return upstream.status
            finally:
                self.balancer.release(replica.url)

    async def _send_buffered(self, upstream: UpstreamResponse, content: bytes, replica: Replica, send: Send) -> None:
        headers = [(k, v) for k, v in upstream.headers
                   if k.lower() not in (b"transfer-encoding", b"connection", b"content-length", b"content-encoding")]
        headers += [(b"content-length", str(len(content)).encode()), (b"x-lmkube-replica", replica.name.encode())]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def create_app(catalog: Catalog, keys: KeyRing, settings: GatewaySettings,
               discoveries: list[Discovery] | None = None) -> Gateway:
    return Gateway(catalog, keys, settings, discoveries)
