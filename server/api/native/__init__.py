"""LM Studio's native REST API family (/api/v1)."""

from fastapi import APIRouter

from . import instances, models

router = APIRouter()
for module in (models, instances):
    router.include_router(module.router)
