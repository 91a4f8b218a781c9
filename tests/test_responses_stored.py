"""Stored responses on OpenAI's Responses API with the official openai SDK against a real server:
`previous_response_id` conversations (shared with /api/v1/chat), `store: false`, retrieve and delete, and the
input items pages."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from responses_support import RESPONSE_ID, assert_openai_error, client, http, responses_server
from support import CHAT_MODEL, ServerProcess

__all__ = ["client", "http", "responses_server"]  # fixtures


# -- stored conversations --------------------------------------------------------------------------


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, http: httpx.Client) -> None:
    first = client.responses.create(model=CHAT_MODEL, input="My name is Ada.", temperature=0, max_output_tokens=6)
    second = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0, max_output_tokens=6,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    fresh = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0, max_output_tokens=6,
                                    store=False)
    # The second turn's prompt holds the first turn (its input and its output) ...
    expected = client.chat.completions.create(model=CHAT_MODEL, temperature=0, max_tokens=1, messages=[
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}]).usage.prompt_tokens
    assert second.usage.input_tokens == expected > fresh.usage.input_tokens + first.usage.output_tokens
    # ... and reuses the KV cache of the first.
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # LM Studio's /api/v1/chat continues the same stored conversation, and the other way round.
    native = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "What is my name?", "temperature": 0,
                                             "max_output_tokens": 6, "previous_response_id": first.id}).json()
    assert native["stats"]["input_tokens"] == second.usage.input_tokens
    assert "".join(item["content"] for item in native["output"]) == second.output_text
    third = client.responses.create(model=CHAT_MODEL, input="Thanks", temperature=0, max_output_tokens=3,
                                    previous_response_id=native["response_id"])
    assert third.usage.input_tokens > native["stats"]["input_tokens"] + native["stats"]["total_output_tokens"]


def test_store_false_keeps_nothing(client: openai.OpenAI, responses_server: ServerProcess,
                                   http: httpx.Client) -> None:
    stored_files = responses_server.log_path.parent / "conversations"  # the server's LMKUBE_HOME
    before = set(stored_files.glob("*.json")) if stored_files.exists() else set()
    for stream in (False, True):
        if stream:
            events = list(client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, store=False,
                                                  stream=True))
            unstored = events[-1].response
        else:
            unstored = client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, store=False)
        assert RESPONSE_ID.fullmatch(unstored.id) and unstored.store is False
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2,
                                    previous_response_id=unstored.id)
        assert caught.value.code == "previous_response_not_found"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.input_items.list(unstored.id)
        assert_openai_error(http.get(f"/v1/responses/{unstored.id}"), 404, code="not_found")
    assert (set(stored_files.glob("*.json")) if stored_files.exists() else set()) == before


def test_unknown_previous_response_id(client: openai.OpenAI, http: httpx.Client) -> None:
    for unknown in ("resp_" + "0" * 48, "resp_nope", "../../etc/passwd"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.responses.create(model=CHAT_MODEL, input="Hi", previous_response_id=unknown)
        assert caught.value.code == "previous_response_not_found"
        assert caught.value.param == "previous_response_id"
    response = http.post("/v1/responses", json={"model": CHAT_MODEL, "input": "Hi",
                                                "previous_response_id": "resp_" + "1" * 48})
    assert_openai_error(response, 404, code="previous_response_not_found", param="previous_response_id")


@pytest.mark.parametrize("stream", [False, True])
def test_stored_response_retrieve_and_delete(client: openai.OpenAI, http: httpx.Client, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": CHAT_MODEL, "input": "Remember me", "temperature": 0,
                              "max_output_tokens": 5, "metadata": {"k": "v"}}
    if stream:
        created = list(client.responses.create(**kwargs, stream=True))[-1].response
    else:
        created = client.responses.create(**kwargs)
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    assert retrieved.status == created.status == "incomplete" and retrieved.output_text == created.output_text
    assert retrieved.usage is not None and retrieved.usage.input_tokens == created.usage.input_tokens
    # A continuation of it, then the delete: OpenAI's deleted object, and it is gone everywhere.
    child = client.responses.create(model=CHAT_MODEL, input="Again", max_output_tokens=2,
                                    previous_response_id=created.id)
    assert client.responses.retrieve(child.id).previous_response_id == created.id
    deleted = http.delete(f"/v1/responses/{created.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response.deleted",
                                                             "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2, previous_response_id=created.id)
    assert caught.value.code == "previous_response_not_found"
    client.responses.delete(child.id)  # the SDK's own delete call
    assert_openai_error(http.get(f"/v1/responses/{child.id}"), 404, code="not_found")
    for bad in ("resp_nope", "nothing-here"):
        assert_openai_error(http.get(f"/v1/responses/{bad}"), 404)
        assert_openai_error(http.delete(f"/v1/responses/{bad}"), 404)


def test_input_items_pages_like_openai(client: openai.OpenAI, http: httpx.Client) -> None:
    items: list[Any] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}],
         "id": "msg_client_given"},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
        {"role": "user", "content": "third"},
    ]
    created = client.responses.create(model=CHAT_MODEL, input=items, max_output_tokens=2, temperature=0)
    # Default order is desc (newest first), limit 20: all seven items, typed by the SDK.
    listed = client.responses.input_items.list(created.id)
    everything = listed.data
    assert [item.type for item in everything] == ["message", "function_call_output", "function_call", "message",
                                                  "message", "message", "message"]
    assert everything[0].content[0].text == "third" and everything[-1].role == "developer"
    assert everything[3].id == "msg_client_given" and everything[3].content[0].text == "second"
    assert everything[4].role == "assistant" and everything[4].content[0].type == "output_text"
    assert everything[1].output == "42" and everything[2].name == "lookup"
    ids = [item.id for item in everything]
    assert len(set(ids)) == 7 and all(ids)
    raw = http.get(f"/v1/responses/{created.id}/input_items").json()
    assert raw["object"] == "list" and raw["first_id"] == ids[0] and raw["last_id"] == ids[-1]
    assert raw["has_more"] is False and [item["id"] for item in raw["data"]] == ids
    # Pages of 3, ascending: the SDK follows `after` through them.
    ascending = client.responses.input_items.list(created.id, order="asc", limit=3)
    assert [item.id for item in ascending.data] == ids[::-1][:3] and ascending.has_more
    assert [item.id for page in ascending.iter_pages() for item in page.data] == ids[::-1]
    after = http.get(f"/v1/responses/{created.id}/input_items",
                     params={"order": "asc", "limit": 3, "after": ids[::-1][5]}).json()
    assert [item["id"] for item in after["data"]] == [ids[0]] and after["has_more"] is False
    before = http.get(f"/v1/responses/{created.id}/input_items", params={"limit": 2, "before": ids[4]}).json()
    assert [item["id"] for item in before["data"]] == ids[2:4] and before["has_more"] is True
    assert before["first_id"] == ids[2] and before["last_id"] == ids[3]
    included = client.responses.input_items.list(created.id, include=["message.input_image.image_url"], limit=1)
    assert [item.id for item in included.data] == ids[:1]
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg_unknown"}, "after")):
        assert_openai_error(http.get(f"/v1/responses/{created.id}/input_items", params=params), 400, param=param)
    # A string input is one user message.
    single = client.responses.create(model=CHAT_MODEL, input="just this", max_output_tokens=1)
    listed_single = client.responses.input_items.list(single.id).data
    assert len(listed_single) == 1 and listed_single[0].role == "user"
    assert listed_single[0].content[0].type == "input_text" and listed_single[0].content[0].text == "just this"


def test_responses_stored_by_native_chat_can_be_retrieved(client: openai.OpenAI, http: httpx.Client) -> None:
    native = http.post("/api/v1/chat", json={"model": CHAT_MODEL, "input": "Hello there", "system_prompt": "Be kind",
                                             "temperature": 0, "max_output_tokens": 4}).json()
    retrieved = client.responses.retrieve(native["response_id"])
    assert retrieved.id == native["response_id"] and retrieved.status == "completed"
    assert retrieved.output_text == "".join(item["content"] for item in native["output"] if item["type"] == "message")
    items = client.responses.input_items.list(native["response_id"], order="asc").data
    assert [(item.role, item.content[0].text) for item in items] == [("system", "Be kind"), ("user", "Hello there")]
