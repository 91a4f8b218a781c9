"""POST /v1/completions: raw text in, no chat template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from ...engine.events import TextDelta
from ...engine.generation import GenerationRequest
from ...errors import bad_request
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..deps import get_manager
from .schemas import CompletionRequest
from .sse import DONE, error_event, usage_chunk

router = APIRouter()


def _prompt_tokens(instance: ModelInstance, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return instance.model.tokenize(prompt, add_special=True, parse_special=False)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        n_vocab = instance.model.n_vocab
        if not prompt or any(not 0 <= t < n_vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in 0..{n_vocab - 1} and not empty", param="prompt")
        return list(prompt)
    raise bad_request("only one prompt per request is supported", param="prompt")


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        tokens = _prompt_tokens(instance, body.prompt)
        generation = inference.submit(instance, tokens, body.sampling(instance.model.n_vocab), param="prompt")
    completion_id = inference.random_id("cmpl-")
    echo = body.prompt if body.echo and isinstance(body.prompt, str) else ""
    if body.stream:
        return EventStreamResponse(_stream(instance, generation, completion_id, body.include_usage, echo))
    with instance.in_use():
        text, finish = await unless_disconnected(request, inference.collect(generation))
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": instance.id,
        "choices": [{"index": 0, "text": echo + text, "logprobs": None,
                     "finish_reason": inference.finish_reason(finish)}],
        "usage": inference.usage(finish),
        "system_fingerprint": instance.id,
    }


async def _stream(
    instance: ModelInstance, generation: GenerationRequest, completion_id: str, include_usage: bool, echo: str
) -> AsyncIterator[bytes]:
    head = orjson.dumps({"id": completion_id, "object": "text_completion", "created": int(time.time()),
                         "model": instance.id, "system_fingerprint": instance.id})[:-1]
    text_open = b"data: " + head + b',"choices":[{"index":0,"text":'
    text_close = b',"logprobs":null,"finish_reason":null}]}\n\n'
    with instance.in_use():
        try:
            if echo:
                yield text_open + orjson.dumps(echo) + text_close
            async for events in generation:
                out = bytearray()
                for event in events:
                    if isinstance(event, TextDelta):
                        out += text_open + orjson.dumps(event.text) + text_close
                    elif event.reason == "error":
                        out += error_event(f"Generation failed: {event.error}") + DONE
                    else:
                        reason = inference.finish_reason(event).encode()
                        out += (b"data: " + head + b',"choices":[{"index":0,"text":"","logprobs":null,'
                                b'"finish_reason":"' + reason + b'"}]}\n\n')
                        if include_usage:
                            out += usage_chunk(head, inference.usage(event))
                        out += DONE
                yield bytes(out)
        finally:
            generation.cancel()
