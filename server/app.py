"""The FastAPI application: routers per API family over one model manager and one model store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from starlette.responses import Response

from .api import anthropic, legacy, native, openai, system
from .api import metrics as metrics_api
from .auth import require_api_token
from .config import ServerConfig
from .conversations import ConversationStore
from .downloads.manager import DownloadManager
from .errors import install_error_handlers
from .logs import log_request
from .metrics import HttpMetrics
from .request_guard import RequestGuardMiddleware
from .request_observer import RequestObserverMiddleware
from .runtime.manager import ModelManager
from .store.model_store import ModelStore
from .streaming import ClientDisconnected


def create_app(config: ServerConfig) -> FastAPI:
    store = ModelStore(config.models_dir)
    manager = ModelManager(store, config.runtime)
    downloads = DownloadManager(store, config.home / "downloads.json")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            downloads.close()  # partial files stay and resume as paused jobs
            await manager.close()

    app = FastAPI(title="lmkube", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.store = store
    app.state.manager = manager
    app.state.downloads = downloads
    app.state.conversations = ConversationStore(config.home / "conversations")
    app.state.api_tokens = tuple(t.encode() for t in config.api_tokens)
    app.state.http_metrics = HttpMetrics()

    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request: Request, _exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    app.include_router(system.router)
    # Prometheus often scrapes without credentials; --public-metrics opts /metrics out of the API tokens.
    app.include_router(metrics_api.router,
                       dependencies=[] if config.public_metrics else [Depends(require_api_token)])
    for family in (openai.router, anthropic.router, native.router, legacy.router):
        app.include_router(family, dependencies=[Depends(require_api_token)])
    public_paths = {route.path for route in system.router.routes if isinstance(route, APIRoute)}
    if config.public_metrics:
        public_paths |= {route.path for route in metrics_api.router.routes if isinstance(route, APIRoute)}
    # Added first, so it runs inside the observer: refused requests still show in /metrics and the logs.
    app.add_middleware(RequestGuardMiddleware, tokens=app.state.api_tokens, public_paths=public_paths,
                       max_body_bytes=config.max_body_bytes)
    app.add_middleware(RequestObserverMiddleware, observers=[app.state.http_metrics.observe, log_request])
    if config.cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=["*"]
        )
    return app
