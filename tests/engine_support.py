"""Helpers for driving a GenerationEngine in-process (tests/test_engine.py, tests/test_prefix_sharing.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmkube.server.engine import llama_lib as lib
from lmkube.server.engine.events import Finish, TextDelta
from lmkube.server.engine.generation import GenerationEngine, GenerationRequest
from lmkube.server.engine.sampling import SamplingParams

# LMKUBE_TEST_GPU=max (scripts/gpu-check.sh on a GPU machine) puts every layer of the models the in-process engine
# tests load on the GPU; servers the tests start offload everything already (a load's `gpu` defaults to "max").
TEST_GPU_LAYERS = 999 if os.environ.get("LMKUBE_TEST_GPU") == "max" else 0


def load_model(path: Path) -> lib.LlamaModel:
    """A model for in-process engine tests, offloaded as LMKUBE_TEST_GPU says."""
    if TEST_GPU_LAYERS and not lib.gpu_offload_supported():
        raise RuntimeError("LMKUBE_TEST_GPU=max, but this llama.cpp build cannot offload to a GPU")
    return lib.LlamaModel(path, n_gpu_layers=TEST_GPU_LAYERS)


def context_config(n_ctx: int = 2048, parallel: int = 4, n_batch: int = 512) -> lib.ContextConfig:
    return lib.ContextConfig(n_ctx=n_ctx, n_seq_max=parallel, n_batch=n_batch, n_threads=1, flash_attention=False)


@contextlib.contextmanager
def running(model: lib.LlamaModel, host_cache_bytes: int = 0, **config: int) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(model, lib.LlamaContext(model, context_config(**config)), name="test",
                              host_cache_bytes=host_cache_bytes)
    try:
        yield engine
    finally:
        engine.close()


def greedy(max_tokens: int | None, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]


@dataclass
class Result:
    deltas: list[str]
    finish: Finish

    @property
    def text(self) -> str:
        return "".join(self.deltas)


async def collect(request: GenerationRequest, deltas: list[str] | None = None) -> Result:
    deltas = [] if deltas is None else deltas
    async for events in request:
        for i, event in enumerate(events):
            if isinstance(event, TextDelta):
                deltas.append(event.text)
            else:
                assert i == len(events) - 1, "events after Finish"
                return Result(deltas, event)
    raise AssertionError("event stream ended without a Finish")


async def first_text(request: GenerationRequest) -> list[str]:
    """Reads events until the request has produced some text (it is then generating)."""
    deltas: list[str] = []
    async for events in request:
        for event in events:
            assert isinstance(event, TextDelta), f"finished before any text: {event}"
            deltas.append(event.text)
        if deltas:
            return deltas
    raise AssertionError("event stream ended without a Finish")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def filler(n: int, start: int = 0) -> list[int]:
    """n prompt tokens: BOS, then ordinary vocabulary pieces (fillers of different `start` share only BOS)."""
    return [1] + [300 + (start + i) % 200 for i in range(n - 1)]
