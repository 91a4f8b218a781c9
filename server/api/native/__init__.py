"""LM Studio's native REST API family (/api/v1)."""

from fastapi import APIRouter

from . import chat, download, instances, logs, models, search

router = APIRouter()
for module in (search, models, download, chat, instances, logs):
    router.include_router(module.router)
