"""Dependencies shared by the routers."""

from __future__ import annotations

from fastapi import Request

from ..runtime.manager import ModelManager


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager
