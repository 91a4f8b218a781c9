"""What one sequence of a generation engine is about: the request it serves (`GenerationRequest`, shared by
the engine thread and the event loop) and its slot (`Slot`: the sequence's cache, sampling and drafting
state), plus `plan_drafts`, which drafts for the slots that have a draft model. The low-level module that
generation.py, slot_cache.py and the API layers share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import llama_lib as lib
from .events import EventStream
from .sampling import SamplingParams
from .speculative import Draft, Drafter, DraftJob, Speculation
from .text_stream import TextStream
from .vision import PromptImages


class GenerationRequest:
    """A prompt and its sampling parameters, as seen by both the engine thread and its event loop."""

    __slots__ = ("_wake_engine", "cancelled", "draft", "events", "images", "params", "prompt", "report_prefill",
                 "submitted_at")

    def __init__(self, wake_engine: Callable[[], None], prompt: list[int], params: SamplingParams,
                 draft: Draft | None = None, images: PromptImages | None = None, *,
                 report_prefill: bool = False) -> None:
        self._wake_engine = wake_engine  # the engine thread sleeps while it has nothing to do
        self.report_prefill = report_prefill  # a PromptProgress event after each prompt chunk but the last
        self.prompt = prompt
        self.params = params
        self.draft = draft
        self.images = images  # the image chunks behind the prompt's placeholder runs (vision.py)
        self.events = EventStream(asyncio.get_running_loop())
        self.cancelled = False
        self.submitted_at = time.perf_counter()

    def cancel(self) -> None:
        """Frees the request's slot at the next step; harmless after the request has finished."""
        if not self.cancelled:
            self.cancelled = True
            self._wake_engine()

    def __aiter__(self) -> EventStream:
        return self.events


@dataclass(eq=False, slots=True)
class Slot:
    seq: int
    request: GenerationRequest | None = None
    cached: list[int] | None = None  # tokens whose KV this sequence holds, in order
    last_used: float = 0.0
    prompt_pos: int = 0
    pending: int = -1  # sampled token not yet decoded
    batch_index: int = -1  # where this slot's logits sit in the current batch, -1 if none
    chunk_end: int = -1  # prompt position the current batch prefills up to, -1 if none
    chain: lib.SamplerChain | None = None
    text: TextStream | None = None
    generated: int = 0
    cached_at_start: int = 0  # prompt tokens reused rather than computed
    started_at: float = 0.0  # when the request got this slot
    first_token_at: float = 0.0
    spec: Speculation | None = None  # drafting state of a request with a draft model
    image_rows: npt.NDArray[np.float32] | None = None  # the encoded image being decoded a slice per step
    image_start: int = -1  # its first prompt position

    @property
    def n_past(self) -> int:
        return len(self.cached) if self.cached else 0

    @property
    def prefilling(self) -> bool:
        return self.request is not None and self.pending < 0


def plan_drafts(slots: Sequence[Slot], n_ctx: int) -> None:
    """Drafts for every generating slot with a draft, one batch per drafter (speculative.py: the scheme)."""
    by_drafter: dict[Drafter, list[tuple[Slot, Speculation, DraftJob]]] = {}
    for slot in slots:
        spec = slot.spec
        if spec is None or slot.request is None or slot.pending < 0:
            continue
        spec.tokens = []
        if spec.skip:
            spec.skip -= 1
            continue
        settings = spec.draft.settings
        cached = slot.cached or []
        limit = min(settings.max_tokens, n_ctx - len(cached) - 2)  # the pending token and a bonus one must fit
        max_tokens = slot.request.params.max_tokens
        if max_tokens is not None:  # each accepted token is one more generated: no drafting past the budget
            limit = min(limit, max_tokens - slot.generated - 1)
        if limit < max(1, settings.min_tokens):
            continue
        job = DraftJob(seq=slot.seq, history=[*cached, slot.pending], limit=limit,
                       settings=settings)
        by_drafter.setdefault(spec.draft.drafter, []).append((slot, spec, job))
    for drafter, jobs in by_drafter.items():
        drafter.draft([job for _, _, job in jobs])
        for _, spec, job in jobs:
            spec.tokens = job.tokens
            if not job.tokens:
                spec.missed()
