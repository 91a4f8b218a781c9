"""Which models are loaded, against real `lmkube serve` processes: JIT loading, idle TTL, auto-evict,
single-flight loads and explicit loads through the native /api/v1 endpoints (LM Studio semantics)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import BYTES_MODEL, CHAT_MODEL, EMBED_MODEL, OTHER_CHAT_MODEL, ServerProcess, wait_until

ServerFactory = Callable[..., ServerProcess]
ALL_MODELS = {CHAT_MODEL, OTHER_CHAT_MODEL, BYTES_MODEL, EMBED_MODEL}
MESSAGES = [{"role": "user", "content": "Say something."}]


# -- helpers -----------------------------------------------------------------------------------------


def instances(server: ServerProcess) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/api/v1/instances", headers=server.headers, timeout=10)
    assert response.status_code == 200, response.text
    return {i["id"]: i for i in response.json()["instances"]}


def listed(server: ServerProcess) -> list[str]:
    response = httpx.get(f"{server.base_url}/v1/models", headers=server.headers, timeout=10)
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


def chat(server: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2, **extra}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers, timeout=60)


def embed(server: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "input": "hello world", **extra}
    return httpx.post(f"{server.base_url}/v1/embeddings", json=body, headers=server.headers, timeout=60)


def load(server: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/models/load", json={"model": model, **extra},
                      headers=server.headers, timeout=60)


def unload(server: ServerProcess, instance_id: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/models/unload", json={"instance_id": instance_id},
                      headers=server.headers, timeout=60)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def load_lines(server: ServerProcess) -> list[str]:
    """The manager's "loading <variant> as <id>" log lines, one per model load."""
    return re.findall(r"loading (acme/\S+) as (\S+)", server.log())


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", max_retries=0)


# -- JIT loading -------------------------------------------------------------------------------------


def test_first_request_jit_loads_a_downloaded_model(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    assert instances(server) == {}
    assert sorted(listed(server)) == sorted(ALL_MODELS)  # JIT on: every downloaded model is listed

    completion = sdk(server).chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3)
    assert completion.model == CHAT_MODEL
    assert completion.usage is not None and completion.usage.completion_tokens == 3

    loaded = instances(server)
    assert list(loaded) == [CHAT_MODEL]
    instance = loaded[CHAT_MODEL]
    assert instance["jit"] is True
    assert instance["variant"] == f"{CHAT_MODEL}@f16"  # the selected variant of a multi-variant model
    assert (instance["type"], instance["status"], instance["active"], instance["queued"]) == ("llm", "idle", 0, 0)
    assert sorted(listed(server)) == sorted(ALL_MODELS)  # the loaded instance is not listed twice
    assert load_lines(server) == [(f"{CHAT_MODEL}@f16", CHAT_MODEL)]

    # The same model again is served by the loaded instance: no second load.
    ok(chat(server, CHAT_MODEL))
    assert len(load_lines(server)) == 1


def test_no_jit_lists_only_loaded_instances_and_refuses_unloaded_models(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--no-jit")
    assert listed(server) == []

    refused = chat(server, CHAT_MODEL)
    assert refused.status_code == 404
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert f'"{CHAT_MODEL}"' in error["message"]
    assert "(none)" in error["message"]  # nothing is available without JIT until something is loaded
    assert embed(server, EMBED_MODEL).status_code == 404
    assert instances(server) == {}  # the refusals loaded nothing

    assert ok(load(server, CHAT_MODEL))["instance_id"] == CHAT_MODEL
    assert listed(server) == [CHAT_MODEL]
    assert ok(chat(server, CHAT_MODEL))["model"] == CHAT_MODEL

    # Another unloaded model is still refused, and the error lists what is available: the loaded instance.
    with pytest.raises(openai.NotFoundError) as caught:
        sdk(server).chat.completions.create(model=OTHER_CHAT_MODEL, messages=MESSAGES, max_tokens=1)
    assert caught.value.code == "model_not_found"
    assert isinstance(caught.value.body, dict)
    message = caught.value.body["message"]
    assert f"  - {CHAT_MODEL}" in message
    assert f"  - {OTHER_CHAT_MODEL}" not in message and f"  - {EMBED_MODEL}" not in message
    assert list(instances(server)) == [CHAT_MODEL]


# -- idle TTL ----------------------------------------------------------------------------------------


def test_request_ttl_sets_the_idle_ttl_of_the_instance_it_jit_loads(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)  # server default --ttl 3600
    ok(chat(server, CHAT_MODEL, ttl=1))
    last_request = time.monotonic()
    assert instances(server)[CHAT_MODEL]["ttl"] == 1

    wait_until(lambda: CHAT_MODEL not in instances(server), timeout=8, message="idle TTL did not unload the model")
    assert time.monotonic() - last_request >= 1.0
    assert f"unloading {CHAT_MODEL}: idle TTL passed" in server.log()

    # The next request JIT-loads it again.
    ok(chat(server, CHAT_MODEL))
    assert instances(server)[CHAT_MODEL]["ttl"] == 3600
    assert len(load_lines(server)) == 2


def test_each_request_resets_the_idle_timer(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    ok(chat(server, CHAT_MODEL, ttl=2))
    started = time.monotonic()
    while time.monotonic() - started < 3.5:  # well past the TTL, one request every 0.5 s
        time.sleep(0.5)
        ok(chat(server, CHAT_MODEL))
        last_request = time.monotonic()
    # Never unloaded (and JIT-loaded again by the next request) in between.
    assert "idle TTL passed" not in server.log()
    assert len(load_lines(server)) == 1
    assert list(instances(server)) == [CHAT_MODEL]

    wait_until(lambda: CHAT_MODEL not in instances(server), timeout=8)
    assert time.monotonic() - last_request >= 2.0


def test_server_ttl_is_the_default_for_jit_loads_but_not_for_explicit_loads(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--ttl", "1")
    ok(load(server, OTHER_CHAT_MODEL))
    ok(chat(server, CHAT_MODEL))
    loaded = instances(server)
    assert loaded[CHAT_MODEL]["ttl"] == 1
    assert loaded[OTHER_CHAT_MODEL]["ttl"] is None  # explicit loads have no TTL unless they ask for one

    wait_until(lambda: CHAT_MODEL not in instances(server), timeout=8)
    assert list(instances(server)) == [OTHER_CHAT_MODEL]


def test_ttl_on_a_request_for_a_loaded_model_changes_nothing(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    ok(load(server, OTHER_CHAT_MODEL))  # explicit: no TTL
    ok(chat(server, CHAT_MODEL, ttl=60))  # JIT-loaded with a 60 s TTL
    ok(chat(server, CHAT_MODEL, ttl=1))
    ok(chat(server, OTHER_CHAT_MODEL, ttl=1))
    loaded = instances(server)
    assert loaded[CHAT_MODEL]["ttl"] == 60
    assert loaded[OTHER_CHAT_MODEL]["ttl"] is None

    time.sleep(2.5)  # past the 1 s the later requests asked for, plus a reaper round
    assert set(instances(server)) == {CHAT_MODEL, OTHER_CHAT_MODEL}
    assert "idle TTL passed" not in server.log()


def test_explicit_load_ttl_unloads_it_when_idle(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    ok(load(server, CHAT_MODEL, ttl=1))
    instance = instances(server)[CHAT_MODEL]
    assert (instance["jit"], instance["ttl"]) == (False, 1)
    wait_until(lambda: instances(server) == {}, timeout=8)


# -- auto-evict --------------------------------------------------------------------------------------


def test_jit_load_evicts_other_jit_loaded_models_but_not_explicit_ones(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    ok(load(server, BYTES_MODEL))  # explicit: never auto-evicted

    ok(chat(server, CHAT_MODEL))
    assert set(instances(server)) == {BYTES_MODEL, CHAT_MODEL}

    ok(chat(server, OTHER_CHAT_MODEL))
    assert set(instances(server)) == {BYTES_MODEL, OTHER_CHAT_MODEL}
    assert f"auto-evicting JIT-loaded {CHAT_MODEL} to load {OTHER_CHAT_MODEL}@f16" in server.log()

    ok(embed(server, EMBED_MODEL))  # an embedding model is JIT-loaded under the same rule
    loaded = instances(server)
    assert set(loaded) == {BYTES_MODEL, EMBED_MODEL}
    assert (loaded[BYTES_MODEL]["jit"], loaded[EMBED_MODEL]["jit"]) == (False, True)

    # The explicitly loaded model serves requests and is still not evicted by later JIT loads.
    ok(chat(server, BYTES_MODEL))
    ok(chat(server, CHAT_MODEL))
    assert set(instances(server)) == {BYTES_MODEL, CHAT_MODEL}


def test_no_auto_evict_keeps_every_jit_loaded_model(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--no-auto-evict")
    ok(chat(server, CHAT_MODEL))
    ok(chat(server, OTHER_CHAT_MODEL))
    ok(embed(server, EMBED_MODEL))
    loaded = instances(server)
    assert set(loaded) == {CHAT_MODEL, OTHER_CHAT_MODEL, EMBED_MODEL}
    assert all(i["jit"] for i in loaded.values())
    assert "auto-evicting" not in server.log()
    ok(chat(server, CHAT_MODEL))  # all still serve without reloading
    assert len(load_lines(server)) == 3


def test_auto_evict_waits_for_requests_running_on_the_evicted_model(
    start_server: ServerFactory, models_dir: Path
) -> None:
    """A JIT load of B does not cut off a generation still streaming from the JIT-loaded A."""
    server = start_server(models_dir)
    ok(chat(server, CHAT_MODEL))

    async def scenario() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 800, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                first = await anext(lines)
                # Hundreds of tokens are left to generate: B's request arrives well inside it.
                other = asyncio.create_task(
                    client.post("/v1/chat/completions",
                                json={"model": OTHER_CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2})
                )
                rest = [line async for line in lines]
            return [first, *rest], await other

    lines, other = asyncio.run(scenario())
    events = [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in events), [line for line in events if '"error"' in line]
    assert '"finish_reason":"length"' in events[-3]
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 800  # ran to the end
    assert other.status_code == 200, other.text
    assert set(instances(server)) == {OTHER_CHAT_MODEL}


def test_concurrent_jit_requests_for_two_models_all_succeed(start_server: ServerFactory, models_dir: Path) -> None:
    """Requests alternating between two models, with auto-evict on, keep handing the model over.

    Regression: a request woken by a finished JIT load used to run on an instance that the next
    load had already freed, which crashed the whole server inside llama.cpp."""
    server = start_server(models_dir)

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        model = (CHAT_MODEL, OTHER_CHAT_MODEL)[i % 2]
        if i % 4 == 0:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        completion = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5
        )
        return completion.choices[0].message.content or ""

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", max_retries=0)
        results: list[str] = []
        for _ in range(6):
            results += await asyncio.gather(*(one(client, i) for i in range(8)))
        return results

    texts = asyncio.run(run())
    assert len(texts) == 48 and all(texts)
    assert server.process.poll() is None
    assert len(instances(server)) == 1  # auto-evict: one JIT-loaded model at a time
    assert "Traceback" not in server.log()


# -- single-flight loads -----------------------------------------------------------------------------


def test_concurrent_first_requests_share_one_load(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            # The model key and its selected variant's key name the same model.
            names = [CHAT_MODEL, f"{CHAT_MODEL}@f16"] * 4
            return await asyncio.gather(*(
                client.post("/v1/chat/completions",
                            json={"model": name, "messages": [{"role": "user", "content": str(i)}], "max_tokens": 3})
                for i, name in enumerate(names)
            ))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.json()["model"] for r in responses} == {CHAT_MODEL}
    assert list(instances(server)) == [CHAT_MODEL]
    assert load_lines(server) == [(f"{CHAT_MODEL}@f16", CHAT_MODEL)]


# -- explicit loads ----------------------------------------------------------------------------------


def test_explicit_loads_identifiers_and_unloads(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    client = sdk(server)

    first = ok(load(server, CHAT_MODEL))
    assert set(first) == {"type", "instance_id", "load_time_seconds", "status"}  # no load_config unless asked
    assert (first["type"], first["instance_id"], first["status"]) == ("llm", CHAT_MODEL, "loaded")
    assert isinstance(first["load_time_seconds"], float) and first["load_time_seconds"] >= 0

    assert ok(load(server, CHAT_MODEL))["instance_id"] == f"{CHAT_MODEL}:2"

    custom = ok(load(server, CHAT_MODEL, identifier="my-tiny", echo_load_config=True, context_length=512,
                     parallel=2))
    assert custom["instance_id"] == "my-tiny"
    assert custom["load_config"] == {
        "context_length": 512, "eval_batch_size": 512, "parallel": 2,
        "flash_attention": custom["load_config"]["flash_attention"], "offload_kv_cache_to_gpu": True,
    }
    assert isinstance(custom["load_config"]["flash_attention"], bool)
    loaded = instances(server)
    assert set(loaded) == {CHAT_MODEL, f"{CHAT_MODEL}:2", "my-tiny"}
    assert (loaded["my-tiny"]["context_length"], loaded["my-tiny"]["parallel"]) == (512, 2)
    assert not any(i["jit"] for i in loaded.values())

    # The identifier and the `:2` id both work as the inference `model`, and reach that instance.
    assert client.chat.completions.create(model="my-tiny", messages=MESSAGES, max_tokens=1).model == "my-tiny"
    assert ok(chat(server, f"{CHAT_MODEL}:2"))["model"] == f"{CHAT_MODEL}:2"
    assert set(instances(server)) == set(loaded)  # nothing was JIT-loaded for them

    native = ok(httpx.get(f"{server.base_url}/api/v1/models"))["models"]
    entry = next(m for m in native if m["key"] == CHAT_MODEL)
    assert {i["id"] for i in entry["loaded_instances"]} == set(loaded)

    taken = load(server, OTHER_CHAT_MODEL, identifier="my-tiny")
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "identifier_in_use"

    assert ok(unload(server, f"{CHAT_MODEL}:2")) == {"instance_id": f"{CHAT_MODEL}:2"}
    assert set(instances(server)) == {CHAT_MODEL, "my-tiny"}
    assert ok(unload(server, "my-tiny")) == {"instance_id": "my-tiny"}
    assert set(instances(server)) == {CHAT_MODEL}
    gone = chat(server, "my-tiny")  # not a model key either, so JIT cannot help
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"

    missing = unload(server, "acme/never-loaded")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert set(error) == {"type", "message", "code", "param"}  # native shape: no null fields
    assert (error["type"], error["code"], error["param"]) == ("model_not_found", "model_not_found", "instance_id")
    assert CHAT_MODEL in error["message"]  # names what is loaded


def test_loading_an_unknown_model_key_fails(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    response = load(server, "acme/missing")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("model_not_found", "model_not_found", "model")
    assert all(key in error["message"] for key in ALL_MODELS)  # lists what could be loaded
    unknown_variant = load(server, f"{CHAT_MODEL}@q4_k_m")
    assert unknown_variant.status_code == 404
    assert f"{CHAT_MODEL}@f16" in unknown_variant.json()["error"]["message"]  # lists the model's variants
    assert instances(server) == {}


def test_variant_keys_load_that_variant(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    f32 = ok(load(server, f"{CHAT_MODEL}@f32", identifier="tiny-f32"))
    assert f32["instance_id"] == "tiny-f32"
    assert instances(server)["tiny-f32"]["variant"] == f"{CHAT_MODEL}@f32"
    # A request naming the variant key is served by the instance of that variant.
    assert ok(chat(server, f"{CHAT_MODEL}@f32"))["model"] == "tiny-f32"

    assert ok(load(server, f"{CHAT_MODEL}@F16"))["instance_id"] == CHAT_MODEL  # case-insensitive quant
    assert {i["id"]: i["variant"] for i in instances(server).values()} == {
        "tiny-f32": f"{CHAT_MODEL}@f32", CHAT_MODEL: f"{CHAT_MODEL}@f16",
    }


def test_models_serve_only_their_own_endpoint(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    client = sdk(server)
    ok(chat(server, CHAT_MODEL))

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED_MODEL, messages=MESSAGES, max_tokens=1)
    assert (caught.value.code, caught.value.param) == ("model_not_supported", "model")
    assert isinstance(caught.value.body, dict) and "embedding model" in caught.value.body["message"]

    wrong = embed(server, CHAT_MODEL)
    assert wrong.status_code == 400
    error = wrong.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_supported", "model")
    completions = httpx.post(f"{server.base_url}/v1/completions", json={"model": EMBED_MODEL, "prompt": "x"})
    assert completions.status_code == 400

    # Refused before loading: the wrong-kind requests did not JIT-load or auto-evict anything.
    assert list(instances(server)) == [CHAT_MODEL]
    assert len(load_lines(server)) == 1

    # Explicitly loaded instances are refused the same way.
    ok(load(server, EMBED_MODEL, identifier="vectors"))
    assert chat(server, "vectors").status_code == 400
    assert ok(embed(server, "vectors"))["model"] == "vectors"
