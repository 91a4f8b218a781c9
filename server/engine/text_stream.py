"""Turns a stream of token pieces into safe text: UTF-8 reassembly and stop strings."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Incremental detokenizer that never emits half a character or the start of a stop string.

    Tokens are byte pieces; a character may span several tokens (byte-fallback models emit single
    bytes constantly), so bytes are held until they complete a character. Invalid sequences become
    U+FFFD rather than an error. Text that could still grow into a stop string is held back until it
    either matches (generation stops, the stop string is not emitted) or cannot match any more.
    """

    __slots__ = ("_decoder", "_held", "_longest_stop", "_stops", "stopped_by")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped_by: str | None = None

    def push(self, piece: bytes) -> str:
        """Adds a token's bytes; returns the text now safe to emit (possibly empty)."""
        if self.stopped_by is not None:  # nothing after a stop string is ever emitted
            return ""
        text = self._decoder.decode(piece)
        if not self._stops:
            return text
        return self._scan(self._held + text)

    def finish(self) -> str:
        """Flushes everything still held at the end of generation."""
        text = self._decoder.decode(b"", final=True)
        if self.stopped_by is not None:
            return ""
        if self._stops:
            emitted = self._scan(self._held + text)
            if self.stopped_by is not None:
                return emitted
            rest, self._held = self._held, ""
            return emitted + rest
        return text

    def _scan(self, text: str) -> str:
        earliest = -1
        for stop in self._stops:
            at = text.find(stop)
            if at != -1 and (earliest == -1 or at < earliest):
                earliest, self.stopped_by = at, stop
        if earliest != -1:
            self._held = ""
            return text[:earliest]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
