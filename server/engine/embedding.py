"""Pooled embeddings: several inputs share each decode, one sequence id per input."""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from . import llama_lib as lib
from .events import QueueFull
from .stats import EngineStats


class InputTooLong(ValueError):
    pass


class EmbeddingEngine:
    """Owns an embeddings context on its own thread; requests queue up and are served in order."""

    def __init__(
        self,
        model: lib.LlamaModel,
        context: lib.LlamaContext,
        *,
        name: str = "model",
        max_queue: int | None = None,
        stats: EngineStats | None = None,
    ) -> None:
        self.model = model
        self.context = context
        self.name = name
        self.n_ctx = context.n_ctx
        self.n_parallel = context.config.n_seq_max
        self.max_queue = max_queue  # jobs waiting behind the running one; None: no limit
        self.stats = stats if stats is not None else EngineStats()
        self._count_lock = threading.Lock()  # _pending is changed from the event loop and the engine thread
        self._jobs: queue.SimpleQueue[tuple[list[list[int]], Future[list[list[float]]]] | None] = (
            queue.SimpleQueue()
        )
        self._pending = 0
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"embed:{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return max(0, self._pending - (1 if self._busy else 0))

    @property
    def active(self) -> int:
        return 1 if self._busy else 0

    def status(self) -> str:
        return "computingEmbedding" if self._busy else "idle"

    async def embed(self, inputs: Sequence[Sequence[int]], *, normalize: bool = True) -> list[list[float]]:
        limit = self.context.config.n_batch
        for tokens in inputs:
            if len(tokens) > limit:
                raise InputTooLong(
                    f"input of {len(tokens)} tokens is longer than this model's context of {limit} tokens"
                )
        future: Future[list[list[float]]] = Future()
        with self._count_lock:
            if self.max_queue is not None and self._pending >= 1 + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(self.name, 1, self._pending - 1, self.stats.retry_after(1))
            self._pending += 1
        self._jobs.put(([list(t) for t in inputs], future))
        vectors = await asyncio.wrap_future(future)
        return [_l2_normalize(v) for v in vectors] if normalize else vectors

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self.context.close()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            inputs, future = job
            self._busy = True
            started = time.perf_counter()
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(self._embed_all(inputs))
                    self.stats.finished(prompt_tokens=sum(len(t) for t in inputs),
                                        prompt_seconds=time.perf_counter() - started, predicted_tokens=0,
                                        predicted_seconds=0.0, sequence_length=max(map(len, inputs), default=0))
            except Exception as exc:
                future.set_exception(exc)
            finally:
                self._busy = False
                with self._count_lock:
                    self._pending -= 1

    def _embed_all(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors: list[list[float]] = []
        batch = self.context.batch
        group: list[list[int]] = []
        for tokens in inputs:
            if group and (len(group) == self.n_parallel or batch_tokens(group) + len(tokens) > batch.capacity):
                vectors.extend(self._embed_group(group))
                group = []
            group.append(tokens)
        if group:
            vectors.extend(self._embed_group(group))
        return vectors

    def _embed_group(self, group: list[list[int]]) -> list[list[float]]:
        ctx = self.context
        ctx.clear()
        ctx.batch.clear()
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                ctx.batch.add(token, pos, seq, True)
        result = ctx.decode()
        self.stats.decode_calls += 1
        self.stats.busy_slots += 1  # one embedding job per decode, however many inputs it batches
        if result != 0:
            raise RuntimeError(f"llama_decode failed ({result}) while embedding")
        n_embd = self.model.n_embd
        return [ctx.sequence_embedding(seq, n_embd) for seq in range(len(group))]


def batch_tokens(group: list[list[int]]) -> int:
    return sum(len(t) for t in group)


def _l2_normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector
