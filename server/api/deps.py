"""Dependencies shared by the route handlers."""

from __future__ import annotations

from fastapi import Request

from ..conversations import ConversationStore
from ..downloads.manager import DownloadManager
from ..runtime.manager import ModelManager


def get_manager(request: Request) -> ModelManager:
    return request.app.state.manager


def get_conversations(request: Request) -> ConversationStore:
    return request.app.state.conversations


def get_downloads(request: Request) -> DownloadManager:
    return request.app.state.downloads
