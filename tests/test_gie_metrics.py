"""The Gateway API Inference Extension's gauges (vLLM's names) in GET /metrics of a real `lmkube serve`.

A tiny generated model whose greedy output never ends on its own is loaded with 2 slots; 4 concurrent streams
fill both slots and queue 2 more. The endpoint picker reads these gauges, so they are parsed with
prometheus_client's parser and must follow the load: up while the streams run, back to 0 once they end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from lmkube.server.gie_metrics import BLOCK_SIZE
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

MODEL = "acme/gie-chat"
PARALLEL = 2
CONTEXT = 8192
PROMPT = 200  # tokens per request, distinct from the first token on: no prefix shared between requests
STREAMS = 4


@pytest.fixture(scope="module")
def srv(start_server: Callable[..., ServerProcess],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("gie-models")
    write_llama_model(models / "acme" / "gie-chat" / "gie-chat-F32.gguf", dtype="f32", seed=4, name="GIE Chat",
                      shape=LlamaShape(n_ctx_train=CONTEXT))
    server = start_server(models, "--parallel", str(PARALLEL), "--threads", "1", "--no-jit")
    response = httpx.post(f"{server.base_url}/api/v1/models/load", timeout=60,
                          json={"model": MODEL, "context_length": CONTEXT})
    assert response.status_code == 200, response.text
    yield server
    server.stop()


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(server: ServerProcess) -> Samples:
    """{sample name: {sorted labels: value}} from GET /metrics, with the declared type of each vllm family."""
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        if family.name.startswith("vllm:"):
            assert family.type == "gauge", (family.name, family.type)
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def gauge(samples: Samples, name: str) -> float:
    return samples[name][(("model_name", MODEL),)]


def prompt(index: int) -> list[int]:
    return [10 + (100 * index + i) % 500 for i in range(PROMPT)]  # the tiny model's vocabulary is 512


@contextlib.asynccontextmanager
async def streams(server: ServerProcess, count: int) -> AsyncIterator[list[asyncio.Task[int]]]:
    """`count` streaming completions that would run for thousands of tokens; closed (cancelled) on exit."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:

        async def one(index: int) -> int:
            body = {"model": MODEL, "prompt": prompt(index), "max_tokens": 4000, "temperature": 0, "stream": True}
            chunks = 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    chunks += 1
            return chunks

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        try:
            yield tasks
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for(server: ServerProcess, check: Callable[[Samples], bool], timeout: float = 60,
                   tasks: list[asyncio.Task[int]] | None = None) -> Samples:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for task in tasks or []:
            if task.done():
                task.result()  # a stream that failed: its error, not a timeout
                raise AssertionError("a stream ended before the gauges showed the load")
        samples = await asyncio.to_thread(scrape, server)
        if check(samples):
            return samples
        shown = {k: v for k, v in samples.items() if k.startswith("vllm")}
        assert asyncio.get_running_loop().time() < deadline, repr(shown)[:600]
        await asyncio.sleep(0.05)


def test_cache_config_describes_the_context_in_blocks(srv: ServerProcess) -> None:
    samples = scrape(srv)
    [(labels, value)] = samples["vllm:cache_config_info"].items()
    assert value == 1
    assert dict(labels) == {"model_name": MODEL, "block_size": str(BLOCK_SIZE),
                            "num_gpu_blocks": str(CONTEXT // BLOCK_SIZE), "enable_prefix_caching": "True"}
    assert gauge(samples, "vllm:num_requests_running") == 0
    assert gauge(samples, "vllm:num_requests_waiting") == 0


def test_the_gauges_follow_concurrent_streams(srv: ServerProcess) -> None:
    def busy(samples: Samples) -> bool:
        # Both slots taken, two more queued, and the running requests' prompts in the KV cache.
        return (gauge(samples, "vllm:num_requests_running") == PARALLEL
                and gauge(samples, "vllm:num_requests_waiting") == STREAMS - PARALLEL
                and gauge(samples, "vllm:kv_cache_usage_perc") >= PARALLEL * PROMPT / CONTEXT)

    async def main() -> tuple[Samples, Samples]:
        async with streams(srv, STREAMS) as tasks:
            loaded = await wait_for(srv, busy, tasks=tasks)
        # The cancelled streams free their slots: nothing runs or waits, and the idle slots' caches, which
        # the engine keeps for prefix reuse but drops when a request needs room, count as free.
        idle = await wait_for(srv, lambda s: gauge(s, "vllm:num_requests_running") == 0
                              and gauge(s, "vllm:num_requests_waiting") == 0)
        return loaded, idle

    loaded, idle = asyncio.run(main())
    usage = gauge(loaded, "vllm:kv_cache_usage_perc")
    # The same counts as llama.cpp's own families in the same scrape.
    assert gauge(loaded, "vllm:num_requests_running") == loaded["llamacpp:requests_processing"][(("model", MODEL),)]
    assert gauge(loaded, "vllm:num_requests_waiting") == loaded["llamacpp:requests_deferred"][(("model", MODEL),)]
    # Used cells over the context: the idle slots' kept prefixes are in llama.cpp's ratio, not in vLLM's.
    assert usage <= loaded["llamacpp:kv_cache_usage_ratio"][(("model", MODEL),)]
    assert gauge(idle, "vllm:kv_cache_usage_perc") == 0
    assert idle["llamacpp:kv_cache_tokens"][(("model", MODEL),)] >= PARALLEL * PROMPT


def test_an_unloaded_model_leaves_the_families_empty(srv: ServerProcess) -> None:
    # Last in this module: it unloads the model the others use.
    response = httpx.post(f"{srv.base_url}/api/v1/models/unload", json={"instance_id": MODEL}, timeout=60)
    assert response.status_code == 200, response.text
    samples = scrape(srv)
    assert not any(samples.get(name) for name in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                                  "vllm:kv_cache_usage_perc", "vllm:cache_config_info"))
