"""How the generation engine takes a prompt's images in while other requests keep generating.

When a prefilling slot reaches an image, the image is encoded (vision encoder and projector, the costly part)
on a worker thread, not the engine thread: the other streams keep stepping meanwhile, and the slot waits. Its
rows of text-model embeddings are then decoded into the slot's sequence IMAGE_SLICE rows per engine step, so
no step waits for more than one slice. An image already in the slot's reused prefix is neither encoded nor
decoded again. Projectors whose decode needs the whole image at once (non-causal attention over it, M-RoPE
positions) take libmtmd's helper in one piece on the engine thread instead.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from . import llama_lib as lib
from .slot import Slot
from .stats import EngineStats
from .vision import Image, Projector, PromptImages

log = logging.getLogger(__name__)

# Image rows decoded per engine step: once an image is encoded, the longest any other stream waits for it is
# the decode of this many rows (about what a prompt chunk of as many tokens costs).
IMAGE_SLICE = 32

Rows = npt.NDArray[np.float32]


class ImagePrefill:
    def __init__(self, projector: Projector, context: lib.LlamaContext, stats: EngineStats, *, name: str,
                 wake: Callable[[], None], fail: Callable[[Slot, str], None],
                 make_room: Callable[[], bool]) -> None:
        self.projector = projector
        self.context = context
        self.stats = stats
        self._wake = wake  # the engine sleeps while every busy slot waits for an encode
        self._fail = fail  # ends a slot's request with an error and forgets its cache
        self._make_room = make_room  # drops idle caches from the KV cache; False when there were none
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vision:{name}")
        self._jobs: dict[int, Future[Rows | None]] = {}  # slot.seq → its image's encode
        self.warm_up()

    def warm_up(self) -> None:
        """The first image a context evaluates pays its graph and buffer set-up: pay it at load, not mid-stream."""
        side = self.projector.image_size
        black = Image(side, side, bytes(side * side * 3))
        _, images = self.projector.tokenize(f"{self.projector.marker}.", [black], add_bos=False)
        for start, (_, chunk) in images.spans.items():
            self.projector.evaluate(self.context, chunk, start, 0)
        self.context.seq_remove(0)

    def close(self) -> None:
        self._encoder.shutdown(wait=True, cancel_futures=True)

    def waiting(self, slot: Slot) -> bool:
        """The slot waits for its image's encode (and has nothing for the engine to do until then)."""
        job = self._jobs.get(slot.seq)
        return job is not None and not job.done()

    def release(self, slot: Slot) -> None:
        """The slot's request ended: an encode in flight is dropped (its result is not waited for)."""
        job = self._jobs.pop(slot.seq, None)
        if job is not None:
            job.cancel()
        slot.image_rows = None
        slot.image_start = -1

    def advance(self, slots: list[Slot]) -> None:
        """One step of every prefilling slot standing at an image: start its encode, or decode one slice."""
        for slot in slots:
            request = slot.request
            if request is None or request.images is None or not slot.prefilling or request.cancelled:
                continue
            found = request.images.at(slot.prompt_pos)
            if found is not None:
                self._advance(slot, *found)

    def _advance(self, slot: Slot, start: int, n_tokens: int, chunk: ctypes.c_void_p) -> None:
        assert slot.cached is not None and slot.request is not None
        if slot.image_start != start:  # a new image for this slot
            if start != slot.prompt_pos:  # a reused prefix ended inside an image (one cut short): redo it whole
                self.context.seq_remove(slot.seq, start, -1)
                del slot.cached[start:]
                slot.cached_at_start = min(slot.cached_at_start, start)
                slot.prompt_pos = start
            if start + n_tokens >= len(slot.request.prompt):
                self._fail(slot, "a prompt must not end with an image")
                return
            slot.image_start, slot.image_rows = start, None
            if not self.projector.sliceable(chunk):
                self._whole(slot, start, n_tokens, chunk)
                return
            # The job holds the request's PromptImages, which own the chunk: a request cancelled meanwhile must not
            # free the chunk under the encoder.
            job = self._encoder.submit(self._encode, slot.request.images, chunk, n_tokens)
            job.add_done_callback(lambda _job: self._wake())
            self._jobs[slot.seq] = job
            return
        if slot.image_rows is None:
            pending = self._jobs.get(slot.seq)
            if pending is None or not pending.done():
                return
            del self._jobs[slot.seq]
            try:
                rows = pending.result()
            except Exception:  # libmtmd raised through ctypes: this request fails, the engine goes on
                log.exception("image encode failed")
                rows = None
            if rows is None:
                self._fail(slot, "the image could not be encoded")
                return
            slot.image_rows = rows
        started = time.perf_counter()
        done = slot.prompt_pos - start
        end = min(n_tokens, done + IMAGE_SLICE, done + self.context.n_batch)
        result = self.context.decode_embeddings(slot.image_rows[done:end], slot.prompt_pos, slot.seq)
        while result == 1 and self._make_room():  # no room in the KV cache: idle caches go first
            result = self.context.decode_embeddings(slot.image_rows[done:end], slot.prompt_pos, slot.seq)
        if result != 0:
            self._fail(slot, f"the image could not be decoded (llama_decode {result})")
            return
        if end == n_tokens:
            slot.image_rows = None
            slot.image_start = -1
        self._progress(slot, start + end, started)

    def _encode(self, owner: PromptImages | None, chunk: ctypes.c_void_p, n_tokens: int) -> Rows | None:
        """On the encoder thread; `owner` keeps the chunk alive until the encode is done."""
        started = time.perf_counter()
        rows = self.projector.encode(chunk, n_tokens)
        self.stats.image_encode_seconds += time.perf_counter() - started
        self.stats.images_evaluated += 1
        return rows

    def _whole(self, slot: Slot, start: int, n_tokens: int, chunk: ctypes.c_void_p) -> None:
        started = time.perf_counter()
        result = self.projector.evaluate(self.context, chunk, start, slot.seq)
        slot.image_start = -1
        if result != 0:
            self._fail(slot, f"the image could not be evaluated (libmtmd error {result})")
            return
        self.stats.images_evaluated += 1
        self._progress(slot, start + n_tokens, started)

    def _progress(self, slot: Slot, pos: int, started: float) -> None:
        assert slot.cached is not None and slot.request is not None
        slot.cached.extend(slot.request.prompt[slot.prompt_pos : pos])
        slot.prompt_pos = pos
        self.stats.image_seconds += time.perf_counter() - started  # every other stream waited this long

