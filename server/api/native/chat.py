"""LM Studio's native /api/v1 chat endpoints."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1")
