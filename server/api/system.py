"""Unauthenticated probes: `/` (GET and HEAD: Claude Code checks the base URL with HEAD), /health and LM
Studio's presence check."""

from __future__ import annotations


async def root() -> dict[str, str]:
    return {"status": "ok", "server": "lmkube"}


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def lmstudio_greeting() -> dict[str, bool]:
    return {"lmstudio": True}
