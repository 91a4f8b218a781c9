"""Unauthenticated probes: /health and LM Studio's presence check."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/lmstudio-greeting")
async def lmstudio_greeting() -> dict[str, bool]:
    return {"lmstudio": True}
