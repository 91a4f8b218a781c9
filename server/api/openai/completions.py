"""POST /v1/completions: raw text in, no chat template."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from ...chat.prompt import refuse_oversized
from ...engine.llama_lib import TooManyTokens
from ...errors import APIError, ContextOverflow, bad_request
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse, unless_disconnected
from .. import inference
from ..chat_run import ChatRun, Round
from ..deps import get_manager
from .chat import Shape
from .schemas import CompletionRequest
from .sse import DONE, error_event, usage_chunk


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


async def start_completion(body: CompletionRequest, manager: ModelManager) -> Round:
    """Finds (or JIT-loads) the model, tokenizes the prompt and submits it.

    The caller must start `complete_completion` or `stream_completion` before its next await."""
    run = await ChatRun.open(manager, body.model, ttl=body.ttl, param="prompt",
                             sampling=lambda instance: body.sampling(instance))
    with run.instance.in_use():
        tokens = await asyncio.to_thread(_prompt_tokens, run.instance, body.prompt)
        return await run.submit_tokens(tokens)


def _echo(body: CompletionRequest) -> str:
    return body.prompt if body.echo and isinstance(body.prompt, str) else ""


async def complete_completion(body: CompletionRequest, round: Round, request: Request) -> dict[str, Any]:
    """Runs a non-streaming completion to the end: the text_completion body (`round.finish` is set)."""
    instance = round.instance
    with instance.in_use():
        text, finish = await unless_disconnected(request, round.text())
    response = {
        "id": inference.random_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": instance.id,
        "choices": [{"index": 0, "text": _echo(body) + text, "logprobs": None,
                     "finish_reason": inference.finish_reason(finish)}],
        "usage": inference.usage(finish),
        "system_fingerprint": instance.id,
    }
    if finish.draft_model is not None:
        response["stats"] = inference.draft_stats(finish)
    return response


def stream_completion(body: CompletionRequest, round: Round) -> EventStreamResponse:
    return EventStreamResponse(_stream(round, inference.random_id("cmpl-"), body.include_usage, _echo(body)))


async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    return await respond(body, request, manager)


async def respond(body: CompletionRequest, request: Request, manager: ModelManager,
                  shape: Shape | None = None) -> dict[str, Any] | EventStreamResponse:
    """The stream, or the text_completion body (passed through `shape`, as /api/v0 does, when given)."""
    round = await start_completion(body, manager)
    if body.stream:
        return stream_completion(body, round)
    response = await complete_completion(body, round, request)
    return shape(response, round) if shape is not None else response


async def _stream(round: Round, completion_id: str, include_usage: bool, echo: str) -> AsyncIterator[bytes]:
    instance = round.instance
    head = orjson.dumps({"id": completion_id, "object": "text_completion", "created": int(time.time()),
                         "model": instance.id, "system_fingerprint": instance.id})[:-1]
    text_open = b"data: " + head + b',"choices":[{"index":0,"text":'
    text_close = b',"logprobs":null,"finish_reason":null}]}\n\n'
    with instance.in_use():
        try:
            if echo:
                yield text_open + orjson.dumps(echo) + text_close
            async for pieces in round.texts():
                # The hot path: every pending piece's frame into one list, one join, one write.
                parts: list[bytes] = []
                for text in pieces:
                    parts += (text_open, orjson.dumps(text), text_close)
                if (finish := round.finish) is not None:
                    reason = inference.finish_reason(finish).encode()
                    parts.append(b"data: " + head + b',"choices":[{"index":0,"text":"","logprobs":null,'
                                 b'"finish_reason":"' + reason + b'"}]}\n\n')
                    if include_usage:
                        stats = inference.draft_stats(finish) if finish.draft_model is not None else None
                        parts.append(usage_chunk(head, inference.usage(finish), stats))
                    parts.append(DONE)
                yield b"".join(parts)
        except APIError as exc:  # the stream has started: report it in-band
            yield error_event(exc.message) + DONE
        finally:
            round.cancel()
