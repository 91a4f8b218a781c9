"""Stored responses: `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.

A `/v1/responses` request with `store` (the default) keeps its Response object and its input items (given ids
where the client sent none, in OpenAI's item shapes) next to the conversation node that `previous_response_id`
continues. Responses stored by `/api/v1/chat` share the ids; they have no Response object of their own, so
one is rebuilt from the stored turn (its messages, without usage). `store: false` keeps nothing, so every route
here answers 404 for it, as does a later `previous_response_id` to it.

input_items pages as OpenAI's list endpoints do: `order` (default "desc"), `limit` (1..100, default 20),
`after` / `before` (an item id: the items after / before it in that order), and `first_id`, `last_id`,
`has_more` in the list object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import Depends, Query

from ...conversations import ConversationNode, ConversationStore
from ...errors import APIError
from ..deps import get_conversations
from .responses_events import item_id

# The id prefix OpenAI gives each kind of item (ids are only for paging here: any unique string works).
_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs",
             "mcp_call": "mcp", "mcp_list_tools": "mcpl", "mcp_approval_request": "mcpr",
             "mcp_approval_response": "mcpa", "item_reference": "ref"}
_INPUT_PARTS = {"input_text", "input_image", "input_file", "input_audio"}


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", code="not_found")


def _parts(content: Any, role: str) -> list[dict[str, Any]]:
    """A message's content as OpenAI's item content parts (a string becomes one text part)."""
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": text_type, "text": content}
        return [part | {"annotations": []} if role == "assistant" else part]
    parts: list[dict[str, Any]] = []
    for raw in content if isinstance(content, list) else []:
        part = dict(raw) if isinstance(raw, Mapping) else {"type": text_type, "text": str(raw)}
        if part.get("type") == "text" or (role != "assistant" and part.get("type") == "output_text"):
            part["type"] = text_type
        if part["type"] == "output_text":
            part.setdefault("annotations", [])
        if part["type"] == "input_image":
            part.setdefault("detail", "auto")
        parts.append(part)
    return parts


def input_items(value: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A request's `input` as the items input_items lists: each with an id and a status, messages with
    content parts (what the openai SDK's ResponseItem types read)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    items: list[dict[str, Any]] = []
    for raw in value:
        item = dict(raw)
        kind = item.setdefault("type", "message")
        if kind == "message":
            item["content"] = _parts(item.get("content"), str(item.get("role")))
        if kind in ("message", "function_call", "function_call_output"):
            item.setdefault("status", "completed")
        if not isinstance(item.get("id"), str) or not item["id"]:
            item["id"] = item_id(_PREFIXES.get(str(kind), "item"))
        items.append(item)
    return items


def _rebuilt(node: ConversationNode) -> dict[str, Any]:
    """The Response object of a node stored by /api/v1/chat: its assistant text and reasoning as output."""
    output: list[dict[str, Any]] = []
    for message in node.messages:
        if message.get("role") != "assistant":
            continue
        if message.get("reasoning_content"):
            output.append({"id": item_id("rs"), "type": "reasoning", "summary": [], "status": "completed",
                           "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}]})
        if message.get("content"):
            output.append({"id": item_id("msg"), "type": "message", "role": "assistant", "status": "completed",
                           "content": _parts(message["content"], "assistant")})
    created = int(node.created_at)
    return {"id": node.id, "object": "response", "created_at": created, "status": "completed",
            "background": False, "completed_at": created, "error": None, "incomplete_details": None,
            "instructions": None, "max_output_tokens": None, "model": node.model, "output": output,
            "parallel_tool_calls": True, "previous_response_id": node.parent_id,
            "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": None,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": None,
            "truncation": "disabled", "usage": None, "user": None, "metadata": {}}


def _node(store: ConversationStore, response_id: str) -> ConversationNode:
    node = store.get(response_id)
    if node is None:
        raise not_found(response_id)
    return node


async def retrieve_response(
    response_id: str,
    store: Annotated[ConversationStore, Depends(get_conversations)],
    stream: bool = False,
) -> dict[str, Any]:
    if stream:
        raise APIError(400, "Streaming a stored response ('stream=true') is not supported by this server; "
                       "retrieve it without stream.", param="stream", code="unsupported_parameter")
    node = _node(store, response_id)
    return node.response if node.response is not None else _rebuilt(node)


async def delete_response(
    response_id: str, store: Annotated[ConversationStore, Depends(get_conversations)]
) -> dict[str, Any]:
    if not store.delete(response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _stored_items(node: ConversationNode) -> list[dict[str, Any]]:
    if node.input_items is not None:
        return node.input_items
    # /api/v1/chat: what the turn added before the model's answer (its system prompt and the user's input).
    turn = [m for m in node.messages if m.get("role") in ("system", "user")]
    return [{"id": f"msg_{node.id[5:]}{index}", "type": "message", "role": m["role"], "status": "completed",
             "content": _parts(m.get("content"), m["role"])} for index, m in enumerate(turn)]


def _index_of(items: list[dict[str, Any]], wanted: str, param: str) -> int:
    for index, item in enumerate(items):
        if item.get("id") == wanted:
            return index
    raise APIError(400, f"Invalid '{param}': no input item with id '{wanted}' in this response.", param=param,
                   code="invalid_value")


async def list_input_items(
    response_id: str,
    store: Annotated[ConversationStore, Depends(get_conversations)],
    after: str | None = None,
    before: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: Annotated[list[str] | None, Query()] = None,
    include_brackets: Annotated[list[str] | None, Query(alias="include[]")] = None,
) -> dict[str, Any]:
    """`include` (`include[]` as the openai SDK writes it) names extra fields to fill in; everything stored is
    always there, so it changes nothing."""
    items = list(_stored_items(_node(store, response_id)))
    if order == "desc":
        items.reverse()
    start, end = 0, len(items)
    if after is not None:
        start = _index_of(items, after, "after") + 1
    if before is not None:
        end = _index_of(items, before, "before")
    window = items[start:end]
    if before is not None and after is None:  # the page right before the cursor
        page = window[-limit:]
        has_more = len(window) > limit
    else:
        page = window[:limit]
        has_more = len(window) > limit
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": has_more}
