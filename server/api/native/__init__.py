"""LM Studio's native REST API family (/api/v1)."""

from fastapi import APIRouter

from . import chat, download, instances, models

router = APIRouter()
for module in (models, download, chat, instances):
    router.include_router(module.router)
