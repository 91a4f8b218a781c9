"""POST /api/v0/chat/completions, /completions and /embeddings: the OpenAI handlers' own code paths,
with v0's `stats`, `model_info` and `runtime` blocks on non-streaming responses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse
from ..deps import get_manager
from ..openai.chat import complete_chat, start_chat, stream_chat
from ..openai.completions import complete_completion, start_completion, stream_completion
from ..openai.embeddings import create_embeddings
from ..openai.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .shapes import decorate


async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    body, round = await start_chat(body, manager)
    if body.stream:
        return stream_chat(round, body.include_usage)
    response = await complete_chat(round, request)
    assert round.finish is not None
    return decorate(response, round.instance, round.finish, round.params, tool_calls=bool(round.result.tool_calls))


async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    round = await start_completion(body, manager)
    if body.stream:
        return stream_completion(body, round)
    response = await complete_completion(body, round, request)
    assert round.finish is not None
    return decorate(response, round.instance, round.finish, round.params)


async def embeddings(
    body: EmbeddingRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any]:
    response, instance = await create_embeddings(body, request, manager)
    response["model"] = instance.variant.key  # LM Studio names the variant here: publisher/model@q4_k_m
    return response
