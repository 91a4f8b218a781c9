"""LM Studio's legacy REST API family (/api/v0): the OpenAI endpoints plus stats, model_info and runtime."""

from fastapi import APIRouter

from . import inference, models

router = APIRouter(prefix="/api/v0")
for module in (models, inference):
    router.include_router(module.router)
