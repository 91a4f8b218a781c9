"""Unauthenticated probes: `/` (GET and HEAD: Claude Code checks the base URL with HEAD), /health and LM
Studio's presence check."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"])
async def root() -> dict[str, str]:
    return {"status": "ok", "server": "lmkube"}


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/lmstudio-greeting")
async def lmstudio_greeting() -> dict[str, bool]:
    return {"lmstudio": True}
