"""The OpenAI-compatible endpoints, driven by the official openai SDK (sync and async) and httpx."""

from __future__ import annotations

import asyncio
import base64
import struct

import httpx
import openai
import pytest
from support import CHAT_MODEL, EMBED_MODEL, ServerProcess

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio")


@pytest.fixture
def async_client(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio")


def test_models_lists_downloaded_models_in_lm_studio_shape(server: ServerProcess) -> None:
    body = httpx.get(f"{server.base_url}/v1/models").json()
    assert list(body) == ["data", "object"]
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert {CHAT_MODEL, EMBED_MODEL, "acme/other-chat"} <= set(ids)
    assert all(m == {"id": m["id"], "object": "model", "owned_by": "organization_owner"} for m in body["data"])


def test_sdk_lists_and_retrieves_models(client: openai.OpenAI) -> None:
    assert CHAT_MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("acme/missing")


def test_chat_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = completion.choices[0]
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == CHAT_MODEL
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 10  # system + user turns through the ChatML template
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_greedy_chat_is_deterministic_and_streaming_matches(client: openai.OpenAI) -> None:
    kwargs = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert first == second == streamed
    assert all(c.choices[0].delta.role == "assistant" for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is None


def test_stream_include_usage_sends_a_final_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stop_string_ends_generation_without_emitting_it(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=32, temperature=0
    ).choices[0].message.content
    assert full and len(full) > 8
    stop = full[5:8]
    stopped = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=32, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kwargs = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0, "seed": 7}
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    assert client.chat.completions.create(**kwargs).choices[0].message.content == first


def test_logit_bias_forces_a_token(client: openai.OpenAI, server: ServerProcess) -> None:
    # Token 300 is a normal vocabulary piece in the generated models; +100 makes it win every step.
    completion = client.completions.create(
        model=CHAT_MODEL, prompt="hello", max_tokens=4, temperature=0, logit_bias={"300": 100}
    )
    again = client.completions.create(
        model=CHAT_MODEL, prompt="hello", max_tokens=4, temperature=0, logit_bias={"300": 100}
    )
    plain = client.completions.create(model=CHAT_MODEL, prompt="hello", max_tokens=4, temperature=0)
    text = completion.choices[0].text
    assert text == again.choices[0].text
    assert text != plain.choices[0].text
    assert len(set(text.split())) <= 1  # the same piece four times


def test_text_completion_and_stream(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8,
                                           temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    chunks = list(client.completions.create(model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text


def test_completions_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=CHAT_MODEL, prompt="abc")
    assert completion.usage is not None and completion.usage.completion_tokens == 16


def test_token_id_prompt(client: openai.OpenAI) -> None:
    text = client.completions.create(model=CHAT_MODEL, prompt=[1, 300, 301], max_tokens=3, temperature=0)
    assert text.usage is not None and text.usage.prompt_tokens == 3


def test_async_client_streams_concurrently(async_client: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> str:
        stream = await async_client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=10,
            temperature=0, stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    texts = asyncio.run(run())
    assert len(texts) == 6 and all(texts)


def test_embeddings_float_and_base64(client: openai.OpenAI, server: ServerProcess) -> None:
    response = client.embeddings.create(model=EMBED_MODEL, input=["hello world", "a different text"])
    assert [d.index for d in response.data] == [0, 1]
    first, second = (d.embedding for d in response.data)
    assert len(first) == 64 and first != second
    assert abs(sum(x * x for x in first) - 1.0) < 1e-4  # normalized
    assert response.usage.prompt_tokens > 4
    raw = httpx.post(f"{server.base_url}/v1/embeddings",
                     json={"model": EMBED_MODEL, "input": "hello world", "encoding_format": "float"}).json()
    encoded = httpx.post(f"{server.base_url}/v1/embeddings",
                         json={"model": EMBED_MODEL, "input": "hello world", "encoding_format": "base64"}).json()
    vector = raw["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(vector)}f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, rel=1e-6)
    assert vector == pytest.approx(first, rel=1e-5)


def test_embeddings_batch_many_inputs(client: openai.OpenAI) -> None:
    texts = [f"sentence number {i}" for i in range(11)]
    batched = client.embeddings.create(model=EMBED_MODEL, input=texts).data
    single = client.embeddings.create(model=EMBED_MODEL, input=texts[7]).data[0]
    assert len(batched) == 11
    assert batched[7].embedding == pytest.approx(single.embedding, abs=1e-4)


def test_health_and_greeting(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/lmstudio-greeting").json() == {"lmstudio": True}
