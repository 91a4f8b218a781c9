"""POST /v1/chat/completions over the shared chat layer (templates, tools, reasoning, grammars, presets)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from ...chat.deltas import ChatDelta, ChatResult, ToolCallDelta
from ...chat.presets import apply_preset, load_preset
from ...chat.session import ChatSpec
from ...engine.events import Finish
from ...errors import APIError
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..chat_run import ChatRun, Round
from ..deps import get_manager
from .schemas import ChatCompletionRequest
from .sse import DONE, error_event, usage_chunk

# A non-streaming body reshaped for another family (from the finished round): /api/v0's extra blocks.
Shape = Callable[[dict[str, Any], Round], dict[str, Any]]


def with_preset(body: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with its preset's defaults filled in; the request's own fields win."""
    if not body.preset:
        return body
    fields = apply_preset(load_preset(body.preset), body.model_dump(exclude_unset=True))
    return ChatCompletionRequest.model_validate(fields)


def chat_spec(body: ChatCompletionRequest) -> ChatSpec:
    return ChatSpec(
        messages=[m.model_dump(exclude_none=True) for m in body.messages],
        tools=body.tools,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=body.response_format,
        reasoning_effort=body.reasoning_effort,
        template_kwargs=dict(body.chat_template_kwargs or {}),
        continue_final=True,  # llama-server's prefill: a final assistant message is continued
    )


async def start_chat(body: ChatCompletionRequest, manager: ModelManager) -> tuple[ChatCompletionRequest, Round]:
    """Applies the preset (the request it returns has it), finds (or JIT-loads) the model, renders the prompt
    and submits it. The caller must start `complete_chat` or `stream_chat` before its next await."""
    body = with_preset(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    run = await ChatRun.open(manager, body.model, ttl=body.ttl,
                             sampling=lambda instance: body.sampling(instance, max_tokens=max_tokens))
    with run.instance.in_use():
        return body, await run.submit(chat_spec(body))


async def complete_chat(round: Round, request: Request) -> dict[str, Any]:
    """Runs a non-streaming chat to the end: the chat.completion body (`round.finish` and `round.result`
    are set)."""
    instance = round.instance
    with instance.in_use():
        finish = await unless_disconnected(request, round.complete())
    result = round.result
    body = {
        "id": inference.random_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": instance.id,
        "choices": [{
            "index": 0,
            "logprobs": None,
            "finish_reason": _finish_reason(finish, result),
            "message": _message(result),
        }],
        "usage": _usage(instance, finish, result),
        "system_fingerprint": instance.id,
    }
    if finish.draft_model is not None:
        body["stats"] = inference.draft_stats(finish)
    return body


def stream_chat(round: Round, include_usage: bool) -> EventStreamResponse:
    return EventStreamResponse(_stream(round, inference.random_id("chatcmpl-"), include_usage))


async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    return await respond(body, request, manager)


async def respond(body: ChatCompletionRequest, request: Request, manager: ModelManager,
                  shape: Shape | None = None) -> dict[str, Any] | EventStreamResponse:
    """The stream, or the chat.completion body (passed through `shape`, as /api/v0 does, when given)."""
    body, round = await start_chat(body, manager)
    if body.stream:
        return stream_chat(round, body.include_usage)
    response = await complete_chat(round, request)
    return shape(response, round) if shape is not None else response


def _message(result: ChatResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.reasoning:
        message["reasoning_content"] = message["reasoning"] = result.reasoning
    if result.tool_calls:
        message["content"] = result.content or None
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.tool_calls
        ]
    return message


def _finish_reason(finish: Finish, result: ChatResult) -> str:
    return "tool_calls" if result.tool_calls else inference.finish_reason(finish)


def _usage(instance: ModelInstance, finish: Finish, result: ChatResult) -> dict[str, Any]:
    usage = inference.usage(finish)
    reasoning = inference.reasoning_tokens(instance, result.reasoning, finish.completion_tokens)
    usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    if piece.id is not None:
        return {"index": piece.index, "id": piece.id, "type": "function",
                "function": {"name": piece.name, "arguments": piece.arguments}}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


async def _stream(round: Round, completion_id: str, include_usage: bool) -> AsyncIterator[bytes]:
    instance = round.instance
    head = orjson.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": instance.id, "system_fingerprint": instance.id})[:-1]
    # Plain content is the hot path: a fixed frame around the JSON-encoded text, one orjson call per token.
    content_open = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
    frame_close = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    delta_open = b"data: " + head + b',"choices":[{"index":0,"delta":'

    def encode(delta: ChatDelta) -> bytes:
        if not delta.reasoning and not delta.tool_calls:
            return b"".join((content_open, orjson.dumps(delta.content), frame_close)) if delta.content else b""
        out = b""
        if delta.reasoning:
            out += delta_open + orjson.dumps({"role": "assistant", "reasoning_content": delta.reasoning,
                                              "reasoning": delta.reasoning}) + frame_close[1:]
        if delta.content:
            out += content_open + orjson.dumps(delta.content) + frame_close
        if delta.tool_calls:
            calls = [_tool_call_delta(p) for p in delta.tool_calls]
            out += delta_open + orjson.dumps({"role": "assistant", "tool_calls": calls}) + frame_close[1:]
        return out

    with instance.in_use():
        try:
            async for deltas in round.deltas():
                out = b"".join([encode(delta) for delta in deltas])  # every pending frame, one write
                if round.finish is not None:
                    out += _closing(head, instance, round.finish, round.result, include_usage)
                if out:
                    yield out
        except APIError as exc:  # the stream has started: report it in-band
            yield error_event(exc.message) + DONE
        finally:
            round.cancel()


def _closing(head: bytes, instance: ModelInstance, finish: Finish, result: ChatResult, include_usage: bool) -> bytes:
    reason = _finish_reason(finish, result).encode()
    out = (b"data: " + head + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
           + reason + b'"}]}\n\n')
    if include_usage:
        stats = inference.draft_stats(finish) if finish.draft_model is not None else None
        out += usage_chunk(head, _usage(instance, finish, result), stats)
    return out + DONE
