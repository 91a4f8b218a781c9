"""The OpenAI-compatible API family: /v1/models, chat completions, completions, embeddings."""

from fastapi import APIRouter

from . import chat, completions, embeddings, models

router = APIRouter()
for module in (models, chat, completions, embeddings):
    router.include_router(module.router)
