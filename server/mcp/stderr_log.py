"""A stdio MCP server's stderr, line by line, into lmkube's log: the logger `lmkube.server.mcp.server.<label>`
(the server's own log output) and `server.log` events on the log bus (`GET /api/v1/logs/stream?source=server`,
`lmkube log stream --source server`), each line prefixed with the server's label as LM Studio prefixes a
plugin's log lines with its name.

Bounded, since the server is someone else's program: a line longer than MAX_LINE_BYTES is cut (the rest is
read and counted, never held), and a server writing faster than LINES_PER_SECOND (after a burst of
BURST_LINES) has the excess dropped, with one line saying how many once it slows down or exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import BinaryIO

from ..logs import BUS, LogBus

MAX_LINE_BYTES = 4096
BURST_LINES = 200
LINES_PER_SECOND = 50.0


def server_logger(label: str) -> logging.Logger:
    return logging.getLogger(f"lmkube.server.mcp.server.{label}")


class StderrForwarder:
    """Reads one server's stderr pipe (in a thread of its own: `run`) and logs and publishes its lines."""

    def __init__(self, label: str, loop: asyncio.AbstractEventLoop, bus: LogBus = BUS) -> None:
        self.label = label
        self._loop = loop
        self._bus = bus
        self._logger = server_logger(label)
        self._tokens = float(BURST_LINES)
        self._refilled = time.monotonic()
        self._dropped = 0

    def run(self, fd: int) -> None:
        """Forwards each line written to `fd` until every writer has closed it (the server and its children)."""
        with os.fdopen(fd, "rb") as pipe:
            while (line := _read_line(pipe)) is not None:
                if line and self._admit():
                    self._emit(line)
        if self._dropped:
            self._emit_dropped()

    def _admit(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(BURST_LINES), self._tokens + (now - self._refilled) * LINES_PER_SECOND)
        self._refilled = now
        if self._tokens < 1:
            self._dropped += 1
            return False
        self._tokens -= 1
        if self._dropped:
            self._emit_dropped()
        return True

    def _emit_dropped(self) -> None:
        count, self._dropped = self._dropped, 0
        self._emit(f"... {count} line{'s' if count != 1 else ''} dropped (more than {LINES_PER_SECOND:g} lines/s)",
                   level="warn")

    def _emit(self, line: str, level: str = "info") -> None:
        self._logger.log(logging.WARNING if level == "warn" else logging.INFO, "%s", line)
        if self._bus.active("server"):  # read off the loop thread: at worst one line more or less is published
            data = {"type": "server.log", "level": level, "content": f"[{self.label}] {line}",
                    "mcpServer": self.label}
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
                self._loop.call_soon_threadsafe(self._bus.publish, "server", data)


def _read_line(pipe: BinaryIO) -> str | None:
    """The next line without its line break, cut to MAX_LINE_BYTES (plus a note of what was cut); None at EOF."""
    raw = pipe.readline(MAX_LINE_BYTES + 1)
    if not raw:
        return None
    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
        cut = len(raw) - MAX_LINE_BYTES
        while (rest := pipe.readline(1 << 16)) and not rest.endswith(b"\n"):
            cut += len(rest)
        cut += len(rest.rstrip(b"\r\n"))
        text = raw[:MAX_LINE_BYTES].decode(errors="replace")
        return f"{text} ... [{cut} more bytes cut]"
    return raw.decode(errors="replace").rstrip()
