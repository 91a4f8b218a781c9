"""POST /api/v0/chat/completions, /completions and /embeddings: the OpenAI handlers' own code paths,
with v0's `stats`, `model_info` and `runtime` blocks on non-streaming responses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse
from ..deps import get_manager
from ..openai import chat
from ..openai import completions as completions_api
from ..openai.embeddings import create_embeddings
from ..openai.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .shapes import decorate


async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    return await chat.respond(body, request, manager, shape=decorate)


async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    return await completions_api.respond(body, request, manager, shape=decorate)


async def embeddings(
    body: EmbeddingRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any]:
    response, instance = await create_embeddings(body, request, manager)
    response["model"] = instance.variant.key  # LM Studio names the variant here: publisher/model@q4_k_m
    return response
