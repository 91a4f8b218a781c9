"""A model load's progress, from llama.cpp's load callback (on the loading thread) to the event loop.

llama.cpp calls back once per tensor it loads (hundreds for a real model) with the fraction of the weights
done. `report` runs on the loading thread: it only hands the fraction to the event loop, at most once per
`STEP` (and always the final 1.0), so the load is never slowed and the loop never flooded. Listeners are
called on the event loop; `fraction` is the latest value, for pollers (`GET /api/v1/instances`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

STEP = 0.01  # the smallest change passed on to the event loop (a full load sends at most ~100 updates)

Listener = Callable[[float], None]


class LoadProgress:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.fraction = 0.0  # as seen on the event loop
        self.started = time.time()
        self._listeners: list[Listener] = []
        self._reported = 0.0  # the last fraction handed over (touched by the loading thread only)

    def report(self, fraction: float) -> None:
        """llama.cpp's callback (the loading thread): passes the fraction on to the event loop."""
        if fraction < 1.0 and fraction - self._reported < STEP:
            return
        self._reported = fraction
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
            self.loop.call_soon_threadsafe(self._publish, fraction)

    def _publish(self, fraction: float) -> None:
        if fraction <= self.fraction:  # only forward: listeners see a rising sequence ending at 1.0
            return
        self.fraction = fraction
        for listener in list(self._listeners):
            listener(fraction)

    def listen(self, listener: Listener) -> None:
        """Calls `listener` (on the event loop) with every later fraction."""
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)
