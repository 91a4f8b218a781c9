"""The FastAPI application: every route of every API family, over one model manager and one model store."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .api import metrics, system
from .api.anthropic import messages
from .api.legacy import models as v0_models
from .api.legacy import openai_routes as v0_openai
from .api.native import chat as native_chat
from .api.native import download, instances, logs, search
from .api.native import models as native_models
from .api.openai import chat, completions, embeddings, responses, responses_store
from .api.openai import models as openai_models
from .config import ServerConfig
from .conversations import ConversationStore
from .downloads.manager import DownloadManager
from .engine.events import QueueFull
from .errors import APIError, error_response, queue_full, validation_error
from .logs import log_request
from .mcp import McpSessions
from .metrics import HttpMetrics
from .request_guard import RequestGuardMiddleware
from .request_observer import RequestObserverMiddleware
from .runtime.manager import ModelManager
from .store.model_store import ModelStore
from .streaming import ClientDisconnected


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str  # in full: FastAPI's lazily included routers would leave a prefix out of the route's name
    endpoint: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)  # add_api_route's keywords


def _post(path: str, endpoint: Callable[..., Any], **options: Any) -> Route:
    return Route(("POST",), path, endpoint, options)


def _get(path: str, endpoint: Callable[..., Any], **options: Any) -> Route:
    return Route(("GET",), path, endpoint, options)


# Every route the server answers. These need no API token (probes; `/metrics` too with --public-metrics).
PUBLIC_ROUTES = (
    _get("/", system.root),
    # Claude Code checks the base URL with HEAD. A route of its own, named apart: one route for both methods would
    # give both operations one id in the OpenAPI document (FastAPI ids a route by its name, path and first method).
    Route(("HEAD",), "/", system.root, {"name": "root_head"}),
    _get("/health", system.health),
    _get("/lmstudio-greeting", system.lmstudio_greeting),
)
METRICS_ROUTE = _get("/metrics", metrics.metrics, response_class=Response)
# `response_model=None`: the handler returns a dict or an event stream, written as it is.
OPENAI_ROUTES = (
    _get("/v1/models", openai_models.list_models),
    _get("/v1/models/{model_id:path}", openai_models.retrieve_model),
    _post("/v1/chat/completions", chat.chat_completions, response_model=None),
    _post("/v1/completions", completions.completions, response_model=None),
    _post("/v1/embeddings", embeddings.embeddings),
    _post("/v1/responses", responses.create_response, response_model=None),
    _get("/v1/responses/{response_id}", responses_store.retrieve_response),
    Route(("DELETE",), "/v1/responses/{response_id}", responses_store.delete_response),
    _get("/v1/responses/{response_id}/input_items", responses_store.list_input_items),
)
ANTHROPIC_ROUTES = (
    _post("/v1/messages", messages.create_message, response_model=None),
    _post("/v1/messages/count_tokens", messages.count_tokens),
)
NATIVE_ROUTES = (
    _get("/api/v1/models/search", search.search_models),
    _get("/api/v1/models/search/variants", search.repo_variants),
    _get("/api/v1/models", native_models.list_models),
    _post("/api/v1/models/load", native_models.load_model, response_model=None),  # JSON, or a stream of events
    _post("/api/v1/models/unload", native_models.unload_model),
    _post("/api/v1/models/download", download.start_download),
    # :path so that any job id is checked for a token, then gets its 404
    _get("/api/v1/models/download/status/{job_id:path}", download.download_status),
    _post("/api/v1/chat", native_chat.chat, response_model=None),
    _get("/api/v1/instances", instances.list_instances),
    _get("/api/v1/logs/stream", logs.stream_logs, response_model=None),
)
LEGACY_ROUTES = (
    _get("/api/v0/models", v0_models.list_models),
    _get("/api/v0/models/{model:path}", v0_models.get_model),
    _post("/api/v0/chat/completions", v0_openai.chat_completions, response_model=None),
    _post("/api/v0/completions", v0_openai.completions, response_model=None),
    _post("/api/v0/embeddings", v0_openai.embeddings),
)


def create_app(config: ServerConfig) -> FastAPI:
    store = ModelStore(config.models_dir)
    manager = ModelManager(store, config.runtime)
    downloads = DownloadManager(store, config.home / "downloads.json")
    mcp_sessions = McpSessions(call_timeout=config.mcp_call_timeout, idle_timeout=config.mcp_idle_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            downloads.close()  # partial files stay and resume as paused jobs
            await mcp_sessions.close()  # stdio MCP servers stop with the server
            await manager.close()

    app = FastAPI(title="lmkube", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.store = store
    app.state.manager = manager
    app.state.downloads = downloads
    app.state.mcp_sessions = mcp_sessions
    app.state.conversations = ConversationStore(config.home / "conversations")
    app.state.api_tokens = tuple(t.encode() for t in config.api_tokens)
    app.state.http_metrics = HttpMetrics()

    install_error_handlers(app)
    for route in (*PUBLIC_ROUTES, METRICS_ROUTE, *OPENAI_ROUTES, *ANTHROPIC_ROUTES, *NATIVE_ROUTES, *LEGACY_ROUTES):
        app.add_api_route(route.path, route.endpoint, methods=list(route.methods), **route.options)
    # Prometheus often scrapes without credentials; --public-metrics opts /metrics out of the API tokens.
    public = (*PUBLIC_ROUTES, METRICS_ROUTE) if config.public_metrics else PUBLIC_ROUTES
    # The API token is checked here, once, for every route but the public ones: before the body is read, which
    # a FastAPI dependency cannot do. Added first, so it runs inside the observer: refused requests still show
    # in /metrics and the logs.
    app.add_middleware(RequestGuardMiddleware, tokens=app.state.api_tokens,
                       public_paths={route.path for route in public}, max_body_bytes=config.max_body_bytes)
    app.add_middleware(RequestObserverMiddleware, observers=[app.state.http_metrics.observe, log_request])
    if config.cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=["*"]
        )
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error in the called family's shape (server/errors.py), whatever raised it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> Response:
        return error_response(request, queue_full(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, validation_error(exc, request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"Unexpected endpoint or method. ({request.method} {request.url.path})"
            return error_response(request, APIError(404, message, code="not_found"))
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            return error_response(request, APIError(405, message, code="method_not_allowed"),
                                  headers={"Allow": _allowed_methods(request)})
        return error_response(request, APIError(exc.status_code, str(exc.detail)),
                              headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request: Request, _exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(request, APIError(500, f"Internal server error: {exc}", type="server_error"))


def _allowed_methods(request: Request) -> str:
    """The Allow header of a 405: the methods of every route on this path (Starlette's router sets none here).

    The table comes from the app's own OpenAPI description, built on the first 405; a path parameter
    matches any text, slashes included (model keys have them)."""
    app = request.app
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(app.state, "route_methods", None)
    if table is None:
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        table = app.state.route_methods = [
            (re.compile(re.sub(r"\\\{[^}]+\\\}", ".+", re.escape(path)) + "$"), {m.upper() for m in operations})
            for path, operations in spec["paths"].items()]
    path = request.url.path
    return ", ".join(sorted({m for pattern, methods in table if pattern.match(path) for m in methods}))
