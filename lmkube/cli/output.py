"""Terminal output: colours only on a TTY (NO_COLOR and TERM=dumb honoured), tables, sizes, JSON."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "cyan": "36"}


def use_color(stream: TextIO) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def style(text: str, *styles: str, stream: TextIO | None = None) -> str:
    if not styles or not use_color(stream or sys.stdout):
        return text
    codes = ";".join(_CODES[s] for s in styles)
    return f"\033[{codes}m{text}\033[0m"


def error(message: str) -> None:
    print(f"{style('lmkube: error:', 'red', 'bold', stream=sys.stderr)} {message}", file=sys.stderr)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "") -> str:
    """Left-aligned columns two spaces apart; the header row bold on a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [style(line(headers), "bold")] + [line(r) for r in rows]
    return "\n".join(lines)


def human_bytes(n: float | None) -> str:
    """Decimal units, as `lms ls` shows sizes."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def gib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / 1024**3:.2f} GiB"


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def ago(iso: str | None) -> str:
    if not iso:
        return "-"
    then = datetime.fromisoformat(iso)
    seconds = (datetime.now(then.tzinfo) - then).total_seconds()
    if seconds < 60:
        return f"{max(int(seconds), 0)}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    return f"{int(seconds // 3600)}h ago"


def choose(prompt: str, options: Sequence[str], default: int = 0) -> int:
    """A numbered menu on the terminal; returns the chosen index (Enter takes the default)."""
    for i, option in enumerate(options, 1):
        marker = style("*", "green") if i - 1 == default else " "
        print(f" {marker} {i:>2}. {option}", file=sys.stderr)
    while True:
        answer = input(f"{prompt} [1-{len(options)}, Enter={default + 1}]: ").strip()
        if not answer:
            return default
        if answer.isdigit() and 1 <= int(answer) <= len(options):
            return int(answer) - 1
        print(f"Enter a number from 1 to {len(options)}.", file=sys.stderr)
