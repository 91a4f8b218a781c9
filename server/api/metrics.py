"""GET /metrics: Prometheus text format (see server/metrics.py for what is exposed and why)."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from ..metrics import CONTENT_TYPE, render


async def metrics(request: Request) -> Response:
    state = request.app.state
    return Response(render(state.manager, state.http_metrics), media_type=CONTENT_TYPE)
