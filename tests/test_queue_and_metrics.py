"""Bounded request queue (--max-queue), instance status and GET /metrics against a real `lmkube serve`.

One server with 2 slots and room for 2 waiting requests serves an explicitly loaded tiny model whose
greedy output never ends on its own (every request runs to max_tokens), so how long a request holds its
slot is set by max_tokens alone. Metrics are parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import EMBED_MODEL, ServerProcess

from lmkube.random_ids import new_token
from lmkube.synthetic_gguf import LlamaShape, write_llama_model

MODEL = "acme/queue-chat"
PREFILL = "prefill"  # a second instance of the same model with a small batch: prompts take many steps
PARALLEL = 2
MAX_QUEUE = 2
CONTEXT = 32768
LONG = 1500  # tokens: a request this long holds its slot for a while on the tiny model


@pytest.fixture(scope="module")
def srv(
    start_server: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("queue-models")
    write_llama_model(models / "acme" / "queue-chat" / "queue-chat-F32.gguf", dtype="f32", seed=4,
                      name="Queue Chat", shape=LlamaShape(n_ctx_train=CONTEXT))
    server = start_server(models, "--parallel", str(PARALLEL), "--max-queue", str(MAX_QUEUE), "--threads", "1",
                          "--no-jit")
    for body in ({"model": MODEL, "context_length": CONTEXT},
                 {"model": MODEL, "identifier": PREFILL, "context_length": CONTEXT, "parallel": 1,
                  "eval_batch_size": 8}):
        response = httpx.post(f"{server.base_url}/api/v1/models/load", timeout=60, json=body)
        assert response.status_code == 200, response.text
    yield server
    server.stop()


def instance(server: ServerProcess, name: str = MODEL) -> dict[str, Any]:
    instances = httpx.get(f"{server.base_url}/api/v1/instances", timeout=10).json()["instances"]
    [found] = [i for i in instances if i["id"] == name]
    return found


def metrics(server: ServerProcess, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics as {(sample name, sorted labels): value}, via prometheus_client's parser."""
    response = httpx.get(f"{server.base_url}/metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def model_sample(samples: dict[Any, float], name: str, model: str = MODEL) -> float:
    return samples[(name, (("model", model),))]


def http_count(samples: dict[Any, float], route: str, status: int, method: str = "POST") -> float:
    labels = (("method", method), ("route", route), ("status", str(status)))
    return samples.get(("lmkube_http_requests_total", labels), 0.0)


def completion(prompt: str | list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_a_full_queue_answers_503_with_retry_after_in_each_family(srv: ServerProcess) -> None:
    before = metrics(srv)
    rejections: list[httpx.Response] = []

    async def stream_one(client: httpx.AsyncClient, i: int) -> tuple[str | None, int]:
        body = completion(f"request {i}", LONG, stream=True, stream_options={"include_usage": True})
        finish, tokens = None, 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = httpx.Response(200, content=line[6:]).json()
                    if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        return finish, tokens

    async def main() -> list[tuple[str | None, int]]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
            streams = [asyncio.create_task(stream_one(client, i)) for i in range(PARALLEL + MAX_QUEUE)]
            deadline = time.monotonic() + 30
            while True:  # every slot taken and every queue place too
                state = (await client.get("/api/v1/instances")).json()["instances"]
                [mine] = [s for s in state if s["id"] == MODEL]
                if (mine["active"], mine["queued"]) == (PARALLEL, MAX_QUEUE):
                    break
                assert time.monotonic() < deadline, mine
                assert not any(s.done() for s in streams), "a request finished before the queue filled"
                await asyncio.sleep(0.005)
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "one more"}], "max_tokens": 4}
            rejections.extend([
                await client.post("/v1/completions", json=completion("one more", 4)),
                await client.post("/v1/completions", json=completion("one more", 4, stream=True)),
                await client.post("/v1/chat/completions", json=chat),
                await client.post("/api/v1/chat", json={"model": MODEL, "input": "one more", "max_output_tokens": 4}),
                await client.post("/v1/messages", json={**chat, "max_tokens": 4}),
                # Streamed, the native chat is refused before its stream starts too (not a 200 with an error event).
                await client.post("/api/v1/chat", json={"model": MODEL, "input": "one more", "max_output_tokens": 4,
                                                        "stream": True}),
                # Every other family, streamed and not: refused before a stream starts, in its own shape.
                await client.post("/v1/chat/completions", json={**chat, "stream": True}),
                await client.post("/v1/responses", json={"model": MODEL, "input": "one more", "max_output_tokens": 16}),
                await client.post("/v1/responses", json={"model": MODEL, "input": "one more", "max_output_tokens": 16,
                                                         "stream": True}),
                await client.post("/v1/messages", json={**chat, "stream": True}),
                await client.post("/api/v0/chat/completions", json=chat),
                await client.post("/api/v0/chat/completions", json={**chat, "stream": True}),
                await client.post("/api/v0/completions", json=completion("one more", 4, stream=True)),
            ])
            assert not any(s.done() for s in streams), "the rejections raced a finishing request"
            return await asyncio.gather(*streams)

    finished = asyncio.run(main())
    # The admitted requests all ran to the end, the queued ones after the running ones.
    assert finished == [("length", LONG)] * (PARALLEL + MAX_QUEUE)

    (openai_plain, openai_stream, openai_chat, native, anthropic, native_stream, chat_stream, responses,
     responses_stream, anthropic_stream, v0_chat, v0_chat_stream, v0_stream) = rejections
    for response in (openai_plain, openai_stream, openai_chat, chat_stream, responses, responses_stream):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "queue_full")
        assert "busy" in error["message"]
    for response in (native, native_stream, v0_chat, v0_chat_stream, v0_stream):  # LM Studio's /api shape
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "queue_full"
    for response in (anthropic, anthropic_stream):
        assert response.status_code == 529, response.text
        assert response.json() == {"type": "error", "error": {"type": "overloaded_error",
                                                              "message": response.json()["error"]["message"]}}
    for response in rejections:
        assert 1 <= int(response.headers["retry-after"]) <= 60

    # Drained: no request left anywhere, and the next one is served at once.
    state = instance(srv)
    assert (state["status"], state["active"], state["queued"]) == ("idle", 0, 0)
    again = httpx.post(f"{srv.base_url}/v1/completions", json=completion("after", 3), timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3

    after = metrics(srv)
    assert model_sample(after, "lmkube_requests_rejected_total") - model_sample(
        before, "lmkube_requests_rejected_total") == len(rejections)
    assert http_count(after, "/v1/completions", 503) - http_count(before, "/v1/completions", 503) == 2
    assert http_count(after, "/v1/messages", 529) - http_count(before, "/v1/messages", 529) == 2
    assert http_count(after, "/v1/completions", 200) - http_count(before, "/v1/completions", 200) == 5
    assert model_sample(after, "lmkube_instance_max_queue") == MAX_QUEUE


def test_instance_status_follows_a_request(srv: ServerProcess) -> None:
    assert instance(srv, PREFILL)["status"] == "idle"
    prompt = [300 + i % 200 for i in range(2400)]  # 300 prefill steps of 8 tokens

    async def main() -> tuple[list[str], httpx.Response]:
        seen: list[str] = []
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
            body = {**completion(prompt, 400), "model": PREFILL}
            request = asyncio.create_task(client.post("/v1/completions", json=body))
            while not request.done():
                state = [s for s in (await client.get("/api/v1/instances")).json()["instances"] if s["id"] == PREFILL]
                if not seen or seen[-1] != state[0]["status"]:
                    seen.append(state[0]["status"])
                await asyncio.sleep(0.002)
            return seen, await request

    seen, response = asyncio.run(main())
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 400
    assert "processingPrompt" in seen and "generating" in seen, seen
    assert seen.index("processingPrompt") < seen.index("generating"), seen
    state = instance(srv, PREFILL)
    assert (state["status"], state["active"], state["queued"]) == ("idle", 0, 0)
    assert state["parallel"] == 1 and state["context_length"] == CONTEXT and state["ttl"] is None
    assert state["last_used"].endswith("+00:00")


def test_metrics_count_exactly_the_usage(srv: ServerProcess) -> None:
    before = metrics(srv)
    unique = f"metrics probe {time.time()}"  # no cached prefix to reuse beyond the first tokens
    responses = [httpx.post(f"{srv.base_url}/v1/completions", json=completion(unique, n), timeout=60)
                 for n in (5, 9)]
    after = metrics(srv)
    usages = [r.json()["usage"] for r in responses]
    evaluated = sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0  # the second request reused the first's prefix

    def delta(name: str) -> float:
        return model_sample(after, name) - model_sample(before, name)

    assert delta("llamacpp:prompt_tokens_total") == evaluated
    assert delta("llamacpp:tokens_predicted_total") == 5 + 9
    assert delta("llamacpp:n_decode_total") >= 5 + 9  # one per generated token at least (prefill adds more)
    assert delta("llamacpp:prompt_seconds_total") > 0 and delta("llamacpp:tokens_predicted_seconds_total") > 0
    assert model_sample(after, "llamacpp:predicted_tokens_seconds") > 0
    assert 1.0 <= model_sample(after, "llamacpp:n_busy_slots_per_decode") <= PARALLEL
    assert model_sample(after, "llamacpp:requests_processing") == 0
    assert model_sample(after, "llamacpp:requests_deferred") == 0
    kv_tokens = model_sample(after, "llamacpp:kv_cache_tokens")
    assert kv_tokens >= usages[1]["total_tokens"] - 1  # the idle slot keeps its prefix
    assert model_sample(after, "llamacpp:kv_cache_usage_ratio") == pytest.approx(kv_tokens / CONTEXT)
    assert http_count(after, "/v1/completions", 200) - http_count(before, "/v1/completions", 200) == 2
    # /metrics counts itself too, under its route, and the histogram agrees with the counter.
    labels = (("method", "POST"), ("route", "/v1/completions"), ("status", "200"))
    assert after[("lmkube_http_request_duration_seconds_count", labels)] == http_count(after, "/v1/completions", 200)
    bucket = ("lmkube_http_request_duration_seconds_bucket", tuple(sorted((*labels, ("le", "+Inf")))))
    assert after[bucket] == http_count(after, "/v1/completions", 200)
    assert http_count(after, "/metrics", 200, method="GET") >= 1
    # Unknown paths share one label value instead of minting a series each.
    httpx.get(f"{srv.base_url}/no/such/path/{time.time()}", timeout=10)
    assert http_count(metrics(srv), "unmatched", 404, method="GET") >= 1


def test_metrics_need_a_token_unless_public(start_server: Callable[..., ServerProcess], models_dir: Any) -> None:
    token = new_token()
    guarded = start_server(models_dir, "--api-token", token, token=token)
    assert httpx.get(f"{guarded.base_url}/metrics", timeout=10).status_code == 401
    assert metrics(guarded, headers=guarded.headers)
    public = start_server(models_dir, "--api-token", token, "--public-metrics", token=token)
    assert metrics(public)
    assert httpx.get(f"{public.base_url}/api/v1/instances", timeout=10).status_code == 401
    guarded.stop()
    public.stop()


@pytest.fixture(scope="module")
def embed_srv(start_server: Callable[..., ServerProcess], models_dir: Any) -> Iterator[ServerProcess]:
    server = start_server(models_dir, "--max-queue", "0", "--threads", "1", "--no-jit")
    response = httpx.post(f"{server.base_url}/api/v1/models/load", json={"model": EMBED_MODEL}, timeout=60)
    assert response.status_code == 200, response.text
    yield server
    server.stop()


def test_embeddings_show_their_status_and_respect_the_queue_limit(embed_srv: ServerProcess) -> None:
    before = metrics(embed_srv)
    inputs = [f"text number {i} " + "word " * 60 for i in range(1000)]  # one job of many batches

    async def main() -> tuple[list[str], httpx.Response, httpx.Response]:
        seen: list[str] = []
        async with httpx.AsyncClient(base_url=embed_srv.base_url, timeout=120) as client:
            big = asyncio.create_task(client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": inputs}))
            while True:
                [state] = (await client.get("/api/v1/instances")).json()["instances"]
                if state["status"] == "computingEmbedding":
                    break
                assert not big.done(), "the embedding job ended before it was seen running"
                await asyncio.sleep(0.002)
            seen.append(state["status"])
            # --max-queue 0: nothing may wait behind the running job.
            refused = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "one more"})
            assert not big.done(), "the refusal raced the end of the job"
            return seen, refused, await big

    seen, refused, big = asyncio.run(main())
    assert seen == ["computingEmbedding"]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    assert big.status_code == 200 and len(big.json()["data"]) == len(inputs)
    [state] = httpx.get(f"{embed_srv.base_url}/api/v1/instances", timeout=10).json()["instances"]
    assert (state["status"], state["active"], state["queued"], state["max_queue"]) == ("idle", 0, 0, 0)
    after = metrics(embed_srv)
    evaluated = big.json()["usage"]["prompt_tokens"]
    assert model_sample(after, "llamacpp:prompt_tokens_total", EMBED_MODEL) - model_sample(
        before, "llamacpp:prompt_tokens_total", EMBED_MODEL) == evaluated
    assert model_sample(after, "lmkube_requests_rejected_total", EMBED_MODEL) == 1
