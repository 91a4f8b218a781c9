"""When each LocalModel is reconciled next: one schedule for all of them instead of a kopf timer per model.

Why not kopf timers: a timer whose (sync) handler is running, or waiting for a worker thread, when its
LocalModel is deleted keeps the finalizer until kopf next polls for the timer's exit
(`settings.background.cancellation_polling`, 60 s), and then runs the delete handler a second time. And a
fixed tick per model keeps hundreds of models that only wait on the cluster busy for nothing.

Here one dispatcher thread hands due models to a small thread pool. A model is never in two passes at once;
the pass says when the next one is due; `poke` (a watch event on one of its objects) brings it forward,
coalescing a burst of events into one pass. `forget` drops everything kept for a model (and waits for a pass
in flight), so an operator that sees models come and go keeps nothing for the ones that went.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("lmkube.operator")

Key = tuple[str, str]  # (namespace, LocalModel name)
# run_pass(key, previous delay) -> seconds until the next pass, or None when the model is gone.
RunPass = Callable[[Key, float], "float | None"]

IDLE, QUEUED, RUNNING = "idle", "queued", "running"


@dataclass
class _Entry:
    due: float = math.inf  # monotonic time of the next pass
    stamp: int = 0  # which heap item is current (older ones for this entry are skipped)
    state: str = IDLE
    again: bool = False  # poked while its pass ran: what the pass read may be old, so run once more
    delay: float = 0.0  # what the last pass asked for (the pass backs off from it)


class Schedule:
    def __init__(self, run_pass: RunPass, alias: Callable[[Key], Hashable], workers: int = 16,
                 settle_seconds: float = 0.5, fallback_seconds: float = 30.0) -> None:
        """`alias(key)`: what `poke` is given for a model (its instance label). `settle_seconds`: how long a
        poke waits for more events of the same burst. `fallback_seconds`: next pass after one that raised."""
        self._run_pass = run_pass
        self._alias = alias
        self._workers = workers
        self.settle_seconds = settle_seconds
        self.fallback_seconds = fallback_seconds
        self._entries: dict[Key, _Entry] = {}
        self._by_alias: dict[Hashable, Key] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._stamps = itertools.count(1)
        self._changed = threading.Condition()
        self._stopped = False
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="lmkube-pass")
        self._dispatcher = threading.Thread(target=self._dispatch, name="lmkube-schedule", daemon=True)
        self._dispatcher.start()

    def stop(self) -> None:
        """Stops dispatching and waits for the passes in flight; the schedule itself is kept."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._dispatcher = self._pool = None

    # -- what the handlers call --------------------------------------------------------------------

    def due_in(self, key: Key, seconds: float = 0.0) -> None:
        """A pass of `key` within `seconds` (adds the model if it is new; never postpones one)."""
        with self._changed:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
                self._by_alias[self._alias(key)] = key
            if entry.state == RUNNING:
                entry.again = True
            elif entry.state == IDLE:
                self._set_due(key, entry, time.monotonic() + seconds)

    def poke(self, alias: Hashable) -> bool:
        """One of a model's objects changed: a pass soon, if the model is known (never adds one). Whether it is."""
        with self._changed:
            key = self._by_alias.get(alias)
        if key is not None:
            self.due_in(key, self.settle_seconds)
        return key is not None

    def forget(self, key: Key, timeout: float = 60.0) -> None:
        """Drops the model; a pass already running is waited for (up to `timeout`), so none runs after this."""
        deadline = time.monotonic() + timeout
        with self._changed:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            self._drop_alias(key)
            self._compact()
            while entry.state == RUNNING and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    def knows(self, key: Key) -> bool:
        with self._changed:
            return key in self._entries

    def known(self) -> dict[Key, float]:
        """Every model kept, with seconds until its next pass (inf while one is queued or running)."""
        now = time.monotonic()
        with self._changed:
            return {key: entry.due - now for key, entry in self._entries.items()}

    def bookkeeping_sizes(self) -> dict[str, int]:
        """How many items each per-model structure holds (a forgotten model leaves none behind)."""
        with self._changed:
            live = sum(1 for _, stamp, key in self._heap if key in self._entries
                       and self._entries[key].stamp == stamp)
            return {"entries": len(self._entries), "aliases": len(self._by_alias), "scheduled": live,
                    "heap": len(self._heap)}

    # -- internals ---------------------------------------------------------------------------------

    def _set_due(self, key: Key, entry: _Entry, due: float) -> None:
        if due >= entry.due:
            return
        entry.due = due
        entry.stamp = next(self._stamps)
        heapq.heappush(self._heap, (due, entry.stamp, key))
        self._compact()
        if self._heap[0][1] == entry.stamp:
            self._changed.notify_all()

    def _compact(self) -> None:
        # Items of forgotten or moved entries wait in the heap until their time; with many models gone at
        # once that would keep a resync interval's worth of garbage.
        if len(self._heap) > 2 * len(self._entries) + 64 or not self._entries:
            self._heap = [item for item in self._heap
                          if (entry := self._entries.get(item[2])) is not None and entry.stamp == item[1]]
            heapq.heapify(self._heap)

    def _drop_alias(self, key: Key) -> None:
        alias = self._alias(key)
        if self._by_alias.get(alias) == key:
            del self._by_alias[alias]

    def _dispatch(self) -> None:
        with self._changed:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, stamp, key = heapq.heappop(self._heap)
                    entry = self._entries.get(key)
                    if entry is None or entry.stamp != stamp:
                        continue  # forgotten, or moved since this item was pushed
                    entry.state, entry.due = QUEUED, math.inf
                    assert self._pool is not None
                    self._pool.submit(self._pass, key, entry)
                self._changed.wait(self._heap[0][0] - now if self._heap else None)

    def _pass(self, key: Key, entry: _Entry) -> None:
        with self._changed:
            if self._entries.get(key) is not entry:
                return
            entry.state = RUNNING
        delay: float | None
        try:
            delay = self._run_pass(key, entry.delay)
        except Exception:
            log.exception("pass of LocalModel %s/%s failed", *key)
            delay = self.fallback_seconds
        with self._changed:
            entry.state = IDLE
            if self._entries.get(key) is not entry:
                self._changed.notify_all()  # forget() may be waiting for this pass
                return
            if delay is None:
                del self._entries[key]
                self._drop_alias(key)
                self._compact()
                return
            entry.delay = delay
            self._set_due(key, entry, time.monotonic() + (self.settle_seconds if entry.again else delay))
            entry.again = False
