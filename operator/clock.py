"""Kubernetes' time strings and epoch seconds, both ways: the operator keeps moments as epoch seconds and
writes them as RFC 3339 UTC, `Time` (whole seconds) or `MicroTime` (microseconds)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso(moment: float) -> str:
    """A `Time`: whole seconds, as the API server writes creationTimestamp and condition times."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_iso(moment: float) -> str:
    """A `MicroTime`: for the times a short delay runs from, which whole seconds would cut short by up to a
    second."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch(text: Any) -> float | None:
    """The moment of an RFC 3339 UTC time, with or without fractional seconds; None when `text` is not one."""
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    try:
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
