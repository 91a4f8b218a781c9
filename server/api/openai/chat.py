"""POST /v1/chat/completions over the shared chat layer (templates, tools, reasoning, grammars, presets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from ...chat.deltas import ChatDelta, ChatResult, ToolCallDelta
from ...chat.presets import apply_preset, load_preset
from ...chat.session import ChatOutput, ChatSpec, PreparedChat, prepare_chat
from ...engine.events import Finish, TextDelta
from ...engine.generation import GenerationRequest
from ...engine.sampling import SamplingParams
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..deps import get_manager
from .schemas import ChatCompletionRequest
from .sse import DONE, error_event, usage_chunk

router = APIRouter()


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
    )


@dataclass(slots=True)
class ChatCall:
    """A chat request submitted to its instance: what the response (plain or streamed) is built from."""

    body: ChatCompletionRequest  # with its preset applied
    instance: ModelInstance
    prepared: PreparedChat
    params: SamplingParams
    generation: GenerationRequest
    completion_id: str


async def start_chat(body: ChatCompletionRequest, manager: ModelManager) -> ChatCall:
    """Applies the preset, finds (or JIT-loads) the model, renders the prompt and submits it.

    The caller must start `complete_chat` or `stream_chat` before its next await."""
    body = with_preset(body)
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        prepared = await asyncio.to_thread(prepare_chat, instance, chat_spec(body))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(instance.model.n_vocab, max_tokens=max_tokens)
        params.grammar = prepared.grammar
        params.render_special = prepared.render_special
        await inference.load_draft(instance, params)
        generation = inference.submit(instance, prepared.prompt, params)
    return ChatCall(body, instance, prepared, params, generation, inference.random_id("chatcmpl-"))


async def complete_chat(call: ChatCall, request: Request) -> tuple[dict[str, Any], Finish, ChatResult]:
    """Runs a non-streaming chat to the end: the chat.completion body, the engine's finish and the parsed result."""
    instance = call.instance
    with instance.in_use():
        output = call.prepared.new_output()
        text, finish = await unless_disconnected(request, inference.collect(call.generation))
        output.feed(text)
        output.finish()
    result = output.result
    body = {
        "id": call.completion_id,
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
    return body, finish, result


def stream_chat(call: ChatCall) -> EventStreamResponse:
    return EventStreamResponse(
        _stream(call.instance, call.prepared, call.generation, call.completion_id, call.body.include_usage)
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    call = await start_chat(body, manager)
    if call.body.stream:
        return stream_chat(call)
    response, _, _ = await complete_chat(call, request)
    return response


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


async def _stream(
    instance: ModelInstance,
    prepared: PreparedChat,
    generation: GenerationRequest,
    completion_id: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
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

    output: ChatOutput = prepared.new_output()
    with instance.in_use():
        try:
            async for events in generation:
                parts: list[bytes] = []  # every pending event's frames, one join, one write
                for event in events:
                    if isinstance(event, TextDelta):
                        parts.append(encode(output.feed(event.text)))
                    elif event.reason == "error":
                        parts += (error_event(f"Generation failed: {event.error}"), DONE)
                    else:
                        parts += (encode(output.finish()), _closing(head, instance, event, output.result,
                                                                    include_usage))
                if out := b"".join(parts):
                    yield out
        finally:
            generation.cancel()


def _closing(head: bytes, instance: ModelInstance, finish: Finish, result: ChatResult, include_usage: bool) -> bytes:
    reason = _finish_reason(finish, result).encode()
    out = (b"data: " + head + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
           + reason + b'"}]}\n\n')
    if include_usage:
        stats = inference.draft_stats(finish) if finish.draft_model is not None else None
        out += usage_chunk(head, _usage(instance, finish, result), stats)
    return out + DONE
