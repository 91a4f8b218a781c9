"""What the engine hands to the API layers: text deltas and one closing event per request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(slots=True)
class TextDelta:
    text: str


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None
    time_to_first_token: float | None = None  # seconds from submission to the first sampled token
    generation_seconds: float = 0.0  # from the first to the last sampled token
    error: str | None = None
    # Speculative decoding (server/engine/speculative.py): the draft model's key and its token counts.
    draft_model: str | None = None
    draft_total: int = 0
    draft_accepted: int = 0
    draft_rejected: int = 0

    @property
    def draft_ignored(self) -> int:
        return self.draft_total - self.draft_accepted - self.draft_rejected

    def draft_stats(self) -> dict[str, object]:
        """LM Studio's draft fields of `stats`; empty without a draft model."""
        if self.draft_model is None:
            return {}
        return {"draft_model": self.draft_model, "total_draft_tokens_count": self.draft_total,
                "accepted_draft_tokens_count": self.draft_accepted,
                "rejected_draft_tokens_count": self.draft_rejected,
                "ignored_draft_tokens_count": self.draft_ignored}

    @property
    def tokens_per_second(self) -> float:
        if self.completion_tokens <= 1 or self.generation_seconds <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.generation_seconds


@dataclass(slots=True)
class PromptProgress:
    """A chunk of the prompt was computed (only for requests that ask, `report_prefill`): `done` of `total`
    prompt tokens to compute (those reused from a cache are in neither)."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total > 0 else 1.0


Event = TextDelta | Finish | PromptProgress


class EventStream:
    """The asyncio side of one request: yields lists of events, ending with a `Finish`.

    The engine thread appends through `deliver` (scheduled with call_soon_threadsafe); consumers get
    everything pending at once, so a slow consumer writes several events per network write.
    """

    __slots__ = ("_buffer", "_finished", "_waiter", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._buffer: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False

    def deliver(self, events: list[Event]) -> None:
        self._buffer.extend(events)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> list[Event]:
        while not self._buffer:
            if self._finished:
                raise StopAsyncIteration
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events, self._buffer = self._buffer, []
        if isinstance(events[-1], Finish):
            self._finished = True
        return events


class QueueFull(RuntimeError):
    """Raised at submit when an instance already holds its running requests plus `--max-queue` waiting ones."""

    def __init__(self, instance: str, running: int, queued: int, retry_after: int) -> None:
        super().__init__(
            f"Model \"{instance}\" is busy: {running} requests running and {queued} waiting, the most this "
            f"server queues. Retry after {retry_after} s."
        )
        self.retry_after = retry_after
