"""GET /metrics: Prometheus text format (see server/metrics.py for what is exposed and why)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..metrics import CONTENT_TYPE, render

router = APIRouter()


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state = request.app.state
    return Response(render(state.manager, state.http_metrics), media_type=CONTENT_TYPE)
