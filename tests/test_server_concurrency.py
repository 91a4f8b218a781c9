"""Concurrency through the real HTTP server: batched results, dropped streams and abandoned requests.

One dedicated server (4 slots, no JIT) serves an explicitly loaded F32 model with flash attention off:
llama.cpp's CPU kernels are not batch-invariant, and with F16 weights or flash attention, greedy texts
of a random-weight model change with the batch a request happens to share (see test_engine.py). The
model's trained context is large so that a request nobody cancels holds its slot for seconds, longer
than the bounded waits below: with cancellation disabled in the server, the instance still had 4 active
and 4 queued requests 10 s after the abandoning clients timed out, and the dropped streams stalled.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

MODEL = "acme/long-chat"
CONTEXT = 32768
PARALLEL = 4


@pytest.fixture(scope="module")
def srv(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("concurrency-models")
    write_llama_model(models / "acme" / "long-chat" / "long-chat-F32.gguf", dtype="f32", seed=1, name="Long Chat",
                      shape=LlamaShape(n_ctx_train=CONTEXT))
    # One llama.cpp thread: on a busy 2-core machine its spinning worker threads only slow everything.
    server = start_server(models, "--parallel", str(PARALLEL), "--threads", "1", "--no-jit")
    response = httpx.post(f"{server.base_url}/api/v1/models/load", timeout=60, json={
        "model": MODEL, "context_length": CONTEXT, "flash_attention": False, "parallel": PARALLEL,
    })
    assert response.status_code == 200, response.text
    assert response.json()["instance_id"] == MODEL
    yield server
    server.stop()


def instance_state(server: ServerProcess) -> dict[str, Any]:
    instances = httpx.get(f"{server.base_url}/api/v1/instances", timeout=10).json()["instances"]
    [instance] = [i for i in instances if i["id"] == MODEL]
    return instance


def wait_until_idle(server: ServerProcess, timeout: float) -> float:
    """Seconds until the instance reports no active and no queued request; fails after `timeout`."""
    started = time.monotonic()
    while True:
        state = instance_state(server)
        if state["active"] == 0 and state["queued"] == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"instance still busy after {timeout}s: {state}")
        time.sleep(0.05)


async def watch_instance(server: ServerProcess, until: asyncio.Future[Any]) -> tuple[int, int]:
    """Highest (active, queued) seen while `until` runs."""
    most_active = most_queued = 0
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        while not until.done():
            [state] = [i for i in (await client.get("/api/v1/instances")).json()["instances"] if i["id"] == MODEL]
            most_active, most_queued = max(most_active, state["active"]), max(most_queued, state["queued"])
            await asyncio.sleep(0.01)
    return most_active, most_queued


def chat_body(i: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Question {i}: tell me about number {i}"}],
            "temperature": 0, **extra}


def test_concurrent_chat_completions_match_sequential(srv: ServerProcess) -> None:
    lengths = [30 + 10 * i for i in range(12)]
    arrivals: list[int] = []  # which streamed request each content chunk belonged to, in arrival order

    async def one(client: openai.AsyncOpenAI, i: int, stream: bool) -> tuple[str, str | None, int | None]:
        messages = chat_body(i)["messages"]
        if not stream:
            completion = await client.chat.completions.create(
                model=MODEL, messages=messages, temperature=0, max_tokens=lengths[i])
            assert completion.usage is not None
            choice = completion.choices[0]
            return choice.message.content or "", choice.finish_reason, completion.usage.completion_tokens
        chunks = []
        async for chunk in await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=lengths[i], stream=True,
            stream_options={"include_usage": True},
        ):
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(i)
        assert chunks[-1].usage is not None
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

    async def main() -> tuple[list[Any], list[Any]]:
        client = openai.AsyncOpenAI(base_url=f"{srv.base_url}/v1", api_key="lm-studio", max_retries=0, timeout=60)
        try:
            sequential = [await one(client, i, stream=False) for i in range(12)]
            arrivals.clear()
            together = await asyncio.gather(*(one(client, i, stream=i % 2 == 0) for i in range(12)))
            return sequential, together
        finally:
            await client.close()

    sequential, together = asyncio.run(main())
    assert [finish for _, finish, _ in sequential] == ["length"] * 12
    assert [tokens for _, _, tokens in sequential] == lengths
    texts = [text for text, _, _ in sequential]
    assert all(texts) and len(set(texts)) == 12
    assert together == sequential
    # The streams really ran side by side: their chunks arrived interleaved, not one stream after another.
    switches = sum(a != b for a, b in itertools.pairwise(arrivals))
    assert switches >= len(set(arrivals)), arrivals  # back-to-back streams would switch one time less


def test_hundreds_of_dropped_streams_free_every_slot(srv: ServerProcess) -> None:
    baseline = httpx.post(f"{srv.base_url}/v1/chat/completions", json=chat_body(7, max_tokens=16), timeout=60)
    assert baseline.status_code == 200

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, i: int) -> int:
        async with gate, client.stream("POST", "/v1/chat/completions", json=chat_body(i, stream=True)) as response:
            assert response.status_code == 200
            if i % 2:
                return 0  # dropped at once: most of these are still waiting for a slot
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    assert line != "data: [DONE]"  # no max_tokens: these would run for thousands of tokens
                    chunks += 1
                    if chunks == 2:
                        return chunks
            raise AssertionError("stream ended early")

    async def main() -> tuple[list[int], tuple[int, int]]:
        gate = asyncio.Semaphore(50)
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=30, limits=limits) as client:
            storm = asyncio.gather(*(one(client, gate, i) for i in range(200)))
            seen = await watch_instance(srv, storm)
            return await storm, seen

    started = time.monotonic()
    read, (most_active, most_queued) = asyncio.run(main())
    storm_seconds = time.monotonic() - started
    assert read == [2, 0] * 100
    assert most_active == PARALLEL and most_queued > 0
    idle_after = wait_until_idle(srv, timeout=30)
    after = httpx.post(f"{srv.base_url}/v1/chat/completions", json=chat_body(7, max_tokens=16), timeout=60)
    assert after.status_code == 200
    assert after.json()["choices"][0] == baseline.json()["choices"][0]
    assert after.json()["usage"]["completion_tokens"] == 16
    print(f"200 dropped streams in {storm_seconds:.1f}s, idle {idle_after:.2f}s later")


def test_abandoned_non_streaming_requests_free_their_slots(srv: ServerProcess) -> None:
    n = 2 * PARALLEL

    async def main() -> tuple[list[Any], tuple[int, int]]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=httpx.Timeout(30, read=2)) as client:
            # No max_tokens: each would generate until the shared context is full (thousands of tokens).
            posts = [asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(i))) for i in range(n)]
            deadline = time.monotonic() + 1.5
            while True:  # all of them reach the engine: 4 generating, 4 waiting
                [state] = [i for i in (await client.get("/api/v1/instances")).json()["instances"] if i["id"] == MODEL]
                during = state["active"], state["queued"]
                if during == (PARALLEL, n - PARALLEL) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            return await asyncio.gather(*posts, return_exceptions=True), during

    results, during = asyncio.run(main())
    assert during == (PARALLEL, n - PARALLEL)
    assert all(isinstance(r, httpx.ReadTimeout) for r in results), results
    idle_after = wait_until_idle(srv, timeout=10)
    assert idle_after < 5
    response = httpx.post(f"{srv.base_url}/v1/chat/completions", json=chat_body(3, max_tokens=5), timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 5
    print(f"abandoned requests released their slots {idle_after:.2f}s after the client timeouts")


def test_concurrent_requests_behind_one_system_prompt_compute_it_once(srv: ServerProcess) -> None:
    system = "You are a patient assistant who answers every question about numbers and their names. " * 10

    def sample(name: str) -> int:
        metrics = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
        [value] = re.findall(rf'^{name}{{model="{MODEL}"}} (\d+)', metrics, re.MULTILINE)
        return int(value)

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{srv.base_url}/v1", api_key="lm-studio", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, temperature=0, max_tokens=4,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}"}],
            ) for i in range(PARALLEL)))
        finally:
            await client.close()

    before = sample("llamacpp:prompt_tokens_total")
    completions = asyncio.run(main())
    evaluated = sample("llamacpp:prompt_tokens_total") - before
    prompts = [c.usage.prompt_tokens for c in completions]
    reused = sorted(c.usage.prompt_tokens_details.cached_tokens for c in completions)
    assert min(prompts) > 150
    # One request computed the system prompt; the others took it from the KV cache.
    assert all(n > 150 for n in reused[1:]), reused
    assert evaluated == sum(prompts) - sum(reused) < sum(prompts) - 3 * 150
    # The followers waited a step for the leader, so it finished first, and its cache was parked in host
    # memory while they ran.
    assert sample("lmkube_host_cache_tokens") >= min(prompts)
    assert sample("lmkube_host_cache_budget_bytes") == 1024 << 20  # --cache-ram's default, outside any memory limit
