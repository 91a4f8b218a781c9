"""LM Studio's native /api/v1 download endpoints; the work is in server/downloads."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict

from ...downloads import DownloadError
from ...errors import APIError
from ..deps import get_downloads


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    quantization: str | None = None


async def start_download(body: DownloadRequest, request: Request) -> dict[str, Any]:
    if not body.model.strip():
        raise APIError(400, "'model' must name a Hugging Face repo (org/name), a Hugging Face URL or a model key.",
                       param="model")
    downloads = get_downloads(request)
    try:
        return await asyncio.to_thread(downloads.start, body.model, body.quantization)
    except DownloadError as exc:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        raise APIError(exc.status, exc.message, type=kind, code=exc.code, param="model") from None


async def download_status(job_id: str, request: Request) -> dict[str, Any]:
    status = get_downloads(request).status(job_id)
    if status is None:
        raise APIError(404, f"No download job with id '{job_id}'.", code="job_not_found")
    return status
