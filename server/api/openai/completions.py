"""POST /v1/completions: raw text in, no chat template."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request

from ...chat.prompt import refuse_oversized
from ...engine.events import Finish, TextDelta
from ...engine.generation import GenerationRequest
from ...engine.llama_lib import TooManyTokens
from ...engine.sampling import SamplingParams
from ...errors import ContextOverflow, bad_request
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
        refuse_oversized(instance, [prompt], param="prompt")
        n_ctx = instance.context_length
        try:
            return instance.model.tokenize(prompt, add_special=True, parse_special=False, limit=n_ctx - 1)
        except TooManyTokens as exc:
            raise ContextOverflow(exc.count, n_ctx, param="prompt") from None
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        n_vocab = instance.model.n_vocab
        if not prompt or any(not 0 <= t < n_vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in 0..{n_vocab - 1} and not empty", param="prompt")
        return list(prompt)
    raise bad_request("only one prompt per request is supported", param="prompt")


@dataclass(slots=True)
class CompletionCall:
    """A text completion submitted to its instance."""

    body: CompletionRequest
    instance: ModelInstance
    params: SamplingParams
    generation: GenerationRequest
    completion_id: str
    echo: str


async def start_completion(body: CompletionRequest, manager: ModelManager) -> CompletionCall:
    """Finds (or JIT-loads) the model, tokenizes the prompt and submits it.

    The caller must start `complete_completion` or `stream_completion` before its next await."""
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="llm")
    with instance.in_use():
        tokens = await asyncio.to_thread(_prompt_tokens, instance, body.prompt)
        params = body.sampling(instance.model.n_vocab)
        await inference.load_draft(instance, params)
        generation = inference.submit(instance, tokens, params, param="prompt")
    echo = body.prompt if body.echo and isinstance(body.prompt, str) else ""
    return CompletionCall(body, instance, params, generation, inference.random_id("cmpl-"), echo)


async def complete_completion(call: CompletionCall, request: Request) -> tuple[dict[str, Any], Finish]:
    """Runs a non-streaming completion to the end: the text_completion body and the engine's finish."""
    instance = call.instance
    with instance.in_use():
        text, finish = await unless_disconnected(request, inference.collect(call.generation))
    body = {
        "id": call.completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": instance.id,
        "choices": [{"index": 0, "text": call.echo + text, "logprobs": None,
                     "finish_reason": inference.finish_reason(finish)}],
        "usage": inference.usage(finish),
        "system_fingerprint": instance.id,
    }
    if finish.draft_model is not None:
        body["stats"] = inference.draft_stats(finish)
    return body, finish


def stream_completion(call: CompletionCall) -> EventStreamResponse:
    return EventStreamResponse(
        _stream(call.instance, call.generation, call.completion_id, call.body.include_usage, call.echo)
    )


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    call = await start_completion(body, manager)
    if body.stream:
        return stream_completion(call)
    response, _ = await complete_completion(call, request)
    return response


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
                # The hot path: every pending event's frame pieces into one list, one join, one write.
                parts: list[bytes] = []
                for event in events:
                    if isinstance(event, TextDelta):
                        parts += (text_open, orjson.dumps(event.text), text_close)
                    elif event.reason == "error":
                        parts += (error_event(f"Generation failed: {event.error}"), DONE)
                    else:
                        reason = inference.finish_reason(event).encode()
                        parts.append(b"data: " + head + b',"choices":[{"index":0,"text":"","logprobs":null,'
                                     b'"finish_reason":"' + reason + b'"}]}\n\n')
                        if include_usage:
                            stats = inference.draft_stats(event) if event.draft_model is not None else None
                            parts.append(usage_chunk(head, inference.usage(event), stats))
                        parts.append(DONE)
                yield b"".join(parts)
        finally:
            generation.cancel()
