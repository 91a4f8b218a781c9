"""The OpenAI-compatible API family: /v1/models, chat completions, completions, embeddings, responses."""

from fastapi import APIRouter

from . import chat, completions, embeddings, models, responses

router = APIRouter()
for module in (models, chat, completions, embeddings, responses):
    router.include_router(module.router)
