"""LM Studio's legacy REST API family (/api/v0): the OpenAI endpoints plus stats, model_info and runtime."""

from fastapi import APIRouter

from . import inference, models

# Each module carries the /api/v0 prefix itself: with FastAPI's lazily included routers, a prefix given
# here is not part of the matched route's path, which names the route in metrics and logs.
router = APIRouter()
for module in (models, inference):
    router.include_router(module.router)
