"""The Anthropic-compatible API family: /v1/messages and /v1/messages/count_tokens."""

from fastapi import APIRouter

from . import messages

router = APIRouter()
router.include_router(messages.router)
