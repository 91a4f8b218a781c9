"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from ...chat.prompt import prompt_tokens, render_chat
from ...engine.events import Finish, TextDelta
from ...engine.generation import GenerationRequest
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..deps import get_manager
from .schemas import ChatCompletionRequest
from .sse import DONE, error_event, usage_chunk

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        text = render_chat(instance, [m.model_dump() for m in body.messages], tools=body.tools)
        tokens = prompt_tokens(instance, text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(instance.model.n_vocab, max_tokens=max_tokens)
        generation = inference.submit(instance, tokens, params)
    completion_id = inference.random_id("chatcmpl-")
    if body.stream:
        return EventStreamResponse(_stream(instance, generation, completion_id, body.include_usage))
    with instance.in_use():
        content, finish = await unless_disconnected(request, inference.collect(generation))
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": instance.id,
        "choices": [{
            "index": 0,
            "logprobs": None,
            "finish_reason": inference.finish_reason(finish),
            "message": {"role": "assistant", "content": content},
        }],
        "usage": inference.usage(finish),
        "system_fingerprint": instance.id,
    }


async def _stream(
    instance: ModelInstance, generation: GenerationRequest, completion_id: str, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())
    head = orjson.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                         "model": instance.id, "system_fingerprint": instance.id})[:-1]
    # The per-token chunk is a fixed frame around the JSON-encoded text: one orjson call per token.
    delta_open = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
    delta_close = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    with instance.in_use():
        try:
            async for events in generation:
                out = bytearray()
                for event in events:
                    if isinstance(event, TextDelta):
                        out += delta_open + orjson.dumps(event.text) + delta_close
                    else:
                        out += _closing(head, event, include_usage)
                yield bytes(out)
        finally:
            generation.cancel()


def _closing(head: bytes, finish: Finish, include_usage: bool) -> bytes:
    if finish.reason == "error":
        return error_event(f"Generation failed: {finish.error}") + DONE
    reason = inference.finish_reason(finish).encode()
    out = (b"data: " + head + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
           + reason + b'"}]}\n\n')
    if include_usage:
        out += usage_chunk(head, finish)
    return out + DONE
