"""Continuous batching over one llama_context.

One engine thread owns the context. Every step it builds a single batch holding the next token of
each generating request plus prompt chunks of requests still prefilling, decodes it once, samples
every request that produced logits and pushes the text to the requests' event loops. Requests beyond
the free slots wait in FIFO order, at most `max_queue` of them (beyond that `submit` raises QueueFull,
so a flood of clients gets a quick "retry later" instead of an ever longer wait). A slot keeps its KV
cache after its request ends so a later request sharing a prefix (multi-turn chat, a common system
prompt) skips recomputing it; slot_cache.py has every way a prompt reuses computed KV. Idle caches are the
first thing dropped when the KV cache runs out of room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Literal

from . import llama_lib as lib
from .events import Event, EventStream, Finish, FinishReason, PromptProgress, QueueFull, TextDelta
from .image_prefill import ImagePrefill
from .sampling import SamplingParams, build_sampler_chain
from .slot import GenerationRequest, Slot, plan_drafts
from .slot_cache import SlotCaches
from .speculative import Draft, Speculation
from .stats import EngineStats
from .text_stream import TextStream
from .vision import Projector, PromptImages

log = logging.getLogger(__name__)

EngineStatus = Literal["idle", "processingPrompt", "generating"]

# Idle caches are parked in host memory before a step that computes at least this many prompt tokens (each
# one would attend over their cells: measured ~0.2 µs per token and idle cell on 2 cores, while parking
# costs ~5 µs per cell), else right after the step.
PARK_BEFORE_PREFILLING = 32


class GenerationEngine:
    def __init__(
        self,
        model: lib.LlamaModel,
        context: lib.LlamaContext,
        *,
        name: str = "model",
        max_queue: int | None = None,
        stats: EngineStats | None = None,
        host_cache_bytes: int = 0,
        projector: Projector | None = None,
    ) -> None:
        self.model = model
        self.projector = projector
        self.context = context
        self.name = name
        self.n_ctx = context.n_ctx
        self.n_parallel = context.config.n_seq_max
        self.max_queue = max_queue  # requests waiting beyond the running ones; None: no limit
        self.stats = stats if stats is not None else EngineStats()
        self._outstanding = 0  # submitted and not yet finished (running + waiting), under _cond
        self._caches = SlotCaches(context, host_cache_bytes)
        self._slots = self._caches.slots
        self._waiting: deque[GenerationRequest] = deque()
        self._inbox: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[EventStream, list[Event]]]] = {}
        self._images = (ImagePrefill(projector, context, self.stats, name=name, wake=self._wake,
                                     fail=self._image_failed, make_room=self._caches.drop_idle)
                        if projector is not None else None)
        self._thread = threading.Thread(target=self._run, name=f"engine:{name}", daemon=True)
        self._thread.start()

    # -- called from event loops ------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams, draft: Draft | None = None,
               images: PromptImages | None = None, *, report_prefill: bool = False) -> GenerationRequest:
        """`report_prefill`: the request's events include a PromptProgress after each prompt chunk."""
        if images is not None:
            draft = None  # a draft model has no projector: it cannot follow a prompt with images
        request = GenerationRequest(self._wake, list(prompt), params, draft, images, report_prefill=report_prefill)
        with self._cond:
            if self._closed:
                raise RuntimeError("engine is closed")
            if self.max_queue is not None and self._outstanding >= self.n_parallel + self.max_queue:
                running = min(self._outstanding, self.n_parallel)
                self.stats.rejected += 1
                raise QueueFull(self.name, running, self._outstanding - running,
                                self.stats.retry_after(self.n_parallel))
            self._outstanding += 1
            self._inbox.append(request)
            self._cond.notify()
        return request

    @property
    def queued(self) -> int:
        with self._cond:  # the engine thread moves requests from _inbox to _waiting under this lock
            return len(self._waiting) + len(self._inbox)

    @property
    def active(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens whose KV the cache holds, idle slots' reusable prefixes included."""
        return self._caches.kv_tokens

    @property
    def kv_tokens_in_use(self) -> int:
        """Tokens whose KV the running requests hold (a snapshot read from another thread, maybe a step old)."""
        return self._caches.kv_tokens_in_use

    @property
    def host_cache_budget_bytes(self) -> int:
        """The most host memory idle caches may take (--cache-ram, capped under a memory limit)."""
        return self._caches.host_budget_bytes

    @property
    def host_cache_tokens(self) -> int:
        """Tokens of idle caches waiting in host memory (read from other threads: a snapshot, maybe a step old)."""
        return self._caches.host_tokens

    def status(self) -> EngineStatus:
        busy = [s for s in self._slots if s.request is not None]
        if not busy:
            return "idle"
        return "generating" if any(not s.prefilling for s in busy) else "processingPrompt"

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._images is not None:
            self._images.close()
        self._caches.close()
        self.context.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._inbox and not self._has_work():
                        self._cond.wait()
                    if self._closed:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                self._drop_cancelled()
                self._assign_slots()
                if any(s.request is not None for s in self._slots):
                    if self._caches.prompt_tokens_ahead >= PARK_BEFORE_PREFILLING:
                        self._caches.offload_idle()
                    self._step()
                self._flush()
                self._caches.offload_idle()  # once this step's tokens are out, so parking never delays them
        except Exception:  # a bug here must not leave clients hanging forever
            log.exception("engine thread crashed")
            self._fail_everything("internal engine error")
        else:
            self._fail_everything("model unloaded")
        finally:
            self._flush()

    def _has_work(self) -> bool:
        images = self._images
        if images is None:
            return bool(self._waiting) or any(s.request is not None for s in self._slots)
        # A slot waiting for its image's encode has nothing to step: the encode's end (or a cancel) wakes us.
        busy = [s for s in self._slots if s.request is not None]
        if self._waiting and len(busy) < len(self._slots):
            return True
        return any(s.request.cancelled or not images.waiting(s) for s in busy if s.request is not None)

    def _image_failed(self, slot: Slot, error: str) -> None:
        self._finish(slot, "error", error=error)
        self._caches.forget(slot)

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self._waiting):
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self._emit(request, Finish("cancelled", len(request.prompt), 0))
        for slot in self._slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")

    def _assign_slots(self) -> None:
        while self._waiting:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return
            request = self._waiting.popleft()
            if len(request.prompt) >= self.n_ctx:
                self._emit(request, Finish("error", len(request.prompt), 0, error=(
                    f"prompt of {len(request.prompt)} tokens does not fit the context of {self.n_ctx}")))
                continue
            self._start(self._caches.best_slot(free, request.prompt), request)

    def _start(self, slot: Slot, request: GenerationRequest) -> None:
        # Build the chain before touching the KV cache: a rejected request must leave the slot's
        # cache and `slot.cached` in agreement.
        try:
            chain = build_sampler_chain(self.model, request.params, request.prompt)
        except ValueError as exc:
            self._emit(request, Finish("error", len(request.prompt), 0, error=str(exc)))
            return
        self._caches.take_for(slot, request)
        slot.chain = chain
        slot.text = TextStream(request.params.stop)
        slot.spec = Speculation(request.draft) if request.draft is not None else None

    def _step(self) -> None:
        allow_prefill = True
        if any(s.spec is not None for s in self._slots):
            plan_drafts(self._slots, self.n_ctx)
        if self._images is not None:
            self._images.advance(self._slots)
        while True:
            self._fill_batch(allow_prefill)
            if self.context.batch.n_tokens == 0:
                return
            result = self.context.decode()
            stats = self.stats
            stats.decode_calls += 1
            stats.busy_slots += sum(1 for s in self._slots if s.batch_index >= 0 or s.chunk_end >= 0)
            if result == 0:
                break
            if result != 1:
                log.error("llama_decode failed with %d", result)
                for slot in self._slots:
                    if slot.request is not None:
                        self._finish(slot, "error", error=f"llama_decode failed ({result})")
                        self._caches.forget(slot)
                return
            # No room left in the KV cache: drop drafts and idle caches first, then hold back prompt chunks
            # so generating requests can finish, and only then end the longest request early.
            if self._drop_drafts() or self._caches.drop_idle():
                continue
            if allow_prefill and any(s.request is not None and not s.prefilling for s in self._slots):
                allow_prefill = False
                continue
            victim = max((s for s in self._slots if s.request is not None), key=lambda s: s.n_past)
            self._finish(victim, "length")
            self._caches.forget(victim)
        self._advance()

    def _fill_batch(self, allow_prefill: bool) -> None:
        batch = self.context.batch
        batch.clear()
        # Every generating slot's pending token fits (n_batch >= n_seq_max); drafts get what room is left.
        spare = batch.capacity - sum(1 for s in self._slots if s.request is not None and s.pending >= 0)
        for slot in self._slots:
            slot.batch_index = slot.chunk_end = -1
            if slot.request is not None and slot.pending >= 0:
                slot.batch_index = batch.add(slot.pending, slot.n_past, slot.seq, True)
                if slot.spec is not None and slot.spec.tokens:
                    del slot.spec.tokens[max(spare, 0):]
                    spare -= len(slot.spec.tokens)
                    for offset, token in enumerate(slot.spec.tokens, start=1):
                        batch.add(token, slot.n_past + offset, slot.seq, True)
        if not allow_prefill:
            return
        for slot in self._slots:
            if slot.request is None or not slot.prefilling or batch.free == 0:
                continue
            if self._caches.share_prefix(slot):
                continue
            prompt = slot.request.prompt
            last = len(prompt) - 1
            slot.chunk_end = min(len(prompt), slot.prompt_pos + batch.free)
            images = slot.request.images
            if images is not None:  # text up to the next image; the image itself is evaluated apart
                if images.at(slot.prompt_pos) is not None:
                    slot.chunk_end = -1
                    continue
                upcoming = images.next_start(slot.prompt_pos)
                if upcoming is not None:
                    slot.chunk_end = min(slot.chunk_end, upcoming)
                if slot.chunk_end == slot.prompt_pos:
                    slot.chunk_end = -1
                    continue
            for pos in range(slot.prompt_pos, slot.chunk_end):
                index = batch.add(prompt[pos], pos, slot.seq, pos == last)
            if slot.chunk_end == len(prompt):
                slot.batch_index = index

    def _advance(self) -> None:
        now = time.perf_counter()
        for slot in self._slots:
            request = slot.request
            if request is None:
                continue
            assert slot.cached is not None
            if slot.chunk_end >= 0:
                slot.cached.extend(request.prompt[slot.prompt_pos : slot.chunk_end])
                slot.prompt_pos = slot.chunk_end
                if request.report_prefill and slot.prompt_pos < len(request.prompt):
                    reused = slot.cached_at_start  # from a cache: not part of the work to report
                    self._emit(request, PromptProgress(slot.prompt_pos - reused, len(request.prompt) - reused))
            elif slot.pending >= 0:
                slot.cached.append(slot.pending)
            if slot.batch_index >= 0:
                self._sample(slot, request, now)

    def _sample(self, slot: Slot, request: GenerationRequest, now: float) -> None:
        assert slot.chain is not None and slot.text is not None and slot.cached is not None
        token = slot.chain.sample(self.context, slot.batch_index)
        if slot.generated == 0:
            slot.first_token_at = now
        spec = slot.spec
        if spec is None or not spec.tokens:
            self._take(slot, request, token)
            return
        # Verify the drafted tokens (decoded right after the pending one): keep them while the target's own
        # sample at each position equals them, then the target's token after the last match.
        drafted, spec.tokens = spec.tokens, []
        spec.total += len(drafted)
        start = len(slot.cached)  # the first drafted token's position
        chain, i = slot.chain, 0
        while True:
            matched = i < len(drafted) and token == drafted[i]
            if matched:
                spec.accepted += 1
            elif i < len(drafted):
                spec.rejected += 1
            if not self._take(slot, request, token) or not matched:
                break
            slot.cached.append(token)  # its KV came with the batch
            i += 1
            token = chain.sample(self.context, slot.batch_index + i)
        spec.verified(accepted=i)
        if len(slot.cached) < start + len(drafted) and not self.context.seq_remove(slot.seq, len(slot.cached), -1):
            if slot.request is not None:
                self._finish(slot, "error", error="could not remove rejected draft tokens from the KV cache")
            self._caches.forget(slot)

    def _take(self, slot: Slot, request: GenerationRequest, token: int) -> bool:
        """Emits a sampled token; False if it ended the request."""
        assert slot.text is not None and slot.cached is not None
        params = request.params
        if not params.ignore_eos and self.model.is_eog(token):
            self._finish(slot, "stop")
            return False
        slot.generated += 1
        text = slot.text.push(self.model.token_bytes(token, special=params.render_special))
        if text:
            self._emit(request, TextDelta(text))
        out_of_budget = params.max_tokens is not None and slot.generated >= params.max_tokens
        if slot.text.stopped_by is not None:
            self._finish(slot, "stop")
        elif out_of_budget or len(slot.cached) + 1 >= self.n_ctx:  # or the next token would not fit
            self._finish(slot, "length")
        else:
            slot.pending = token
            return True
        return False

    def _finish(self, slot: Slot, reason: FinishReason, *, error: str | None = None) -> None:
        request = slot.request
        assert request is not None
        tail = slot.text.finish() if slot.text is not None and reason != "cancelled" else ""
        if tail:
            self._emit(request, TextDelta(tail))
        now = time.perf_counter()
        started = slot.first_token_at
        self.stats.finished(
            prompt_tokens=slot.prompt_pos - slot.cached_at_start,
            prompt_seconds=(started or now) - slot.started_at,
            predicted_tokens=slot.generated,
            predicted_seconds=(now - started) if started else 0.0,
            sequence_length=slot.prompt_pos + slot.generated,
        )
        finish = Finish(
            reason,
            prompt_tokens=len(request.prompt),
            completion_tokens=slot.generated,
            cached_tokens=slot.cached_at_start,
            stop_sequence=slot.text.stopped_by if slot.text is not None else None,
            time_to_first_token=(started - request.submitted_at) if started else None,
            generation_seconds=(now - started) if started else 0.0,
            error=error,
            **(slot.spec.finish_fields() if slot.spec is not None else {}),
        )
        if finish.draft_model is not None:
            self.stats.drafted(finish.draft_accepted, finish.draft_rejected, finish.draft_ignored)
        # Why a request was slow: a long prompt with little of it cached, or a wait for a slot.
        log.info("request %s: %d prompt tokens (%d cached), waited %.2f s, prefill %.2f s, %d tokens generated "
                 "in %.2f s", reason, finish.prompt_tokens, finish.cached_tokens,
                 slot.started_at - request.submitted_at, (started or now) - slot.started_at,
                 finish.completion_tokens, finish.generation_seconds)
        self._emit(request, finish)
        if slot.chain is not None:
            slot.chain.close()
        slot.request = None
        slot.chain = None
        slot.text = None
        slot.spec = None
        if self._images is not None:
            self._images.release(slot)
        slot.pending = -1
        slot.last_used = now

    def _drop_drafts(self) -> bool:
        dropped = False
        for slot in self._slots:
            if slot.spec is not None and slot.spec.tokens:
                slot.spec.tokens = []
                dropped = True
        return dropped

    def _emit(self, request: GenerationRequest, event: Event) -> None:
        if isinstance(event, Finish):  # every request ends with exactly one Finish
            with self._cond:
                self._outstanding -= 1
        stream = request.events
        pending = self._outbox.setdefault(stream.loop, [])
        if pending and pending[-1][0] is stream:
            pending[-1][1].append(event)
        else:
            pending.append((stream, [event]))

    def _flush(self) -> None:
        """Hands this step's events to each event loop in one thread-safe call per loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody left listening
                loop.call_soon_threadsafe(_deliver_all, items)

    def _fail_everything(self, message: str) -> None:
        for slot in self._slots:
            if slot.request is not None:
                self._finish(slot, "error", error=message)
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        while self._waiting:
            request = self._waiting.popleft()
            self._emit(request, Finish("error", len(request.prompt), 0, error=message))


def _deliver_all(items: list[tuple[EventStream, list[Event]]]) -> None:
    for stream, events in items:
        stream.deliver(events)
