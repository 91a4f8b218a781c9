"""POST /api/v0/chat/completions, /completions and /embeddings: the OpenAI handlers' own code paths,
with v0's `stats`, `model_info` and `runtime` blocks on non-streaming responses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from ...runtime.manager import ModelManager
from ...streaming import EventStreamResponse
from ..deps import get_manager
from ..openai.chat import complete_chat, start_chat, stream_chat
from ..openai.completions import complete_completion, start_completion, stream_completion
from ..openai.embeddings import create_embeddings
from ..openai.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .shapes import decorate

router = APIRouter(prefix="/api/v0")


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    call = await start_chat(body, manager)
    if call.body.stream:
        return stream_chat(call)
    response, finish, result = await complete_chat(call, request)
    return decorate(response, call.instance, finish, call.params, tool_calls=bool(result.tool_calls))


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any] | EventStreamResponse:
    call = await start_completion(body, manager)
    if body.stream:
        return stream_completion(call)
    response, finish = await complete_completion(call, request)
    return decorate(response, call.instance, finish, call.params)


@router.post("/embeddings")
async def embeddings(
    body: EmbeddingRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any]:
    response, instance = await create_embeddings(body, request, manager)
    response["model"] = instance.variant.key  # LM Studio names the variant here: publisher/model@q4_k_m
    return response
