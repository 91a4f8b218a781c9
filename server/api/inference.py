"""Shared by every API family: finding the instance for a request and running a generation."""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence

from ..engine.events import Finish, TextDelta
from ..engine.generation import GenerationEngine, GenerationRequest
from ..engine.sampling import SamplingParams
from ..errors import APIError
from ..runtime.instance import ModelInstance
from ..runtime.manager import ModelManager
from ..store.model_store import ModelNotFound

_ID_ALPHABET = string.ascii_lowercase + string.digits


def random_id(prefix: str, length: int = 21) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def model_not_found(exc: ModelNotFound) -> APIError:
    available = "\n".join(f"  - {name}" for name in exc.available) or "  (none)"
    return APIError(
        404,
        f"Model \"{exc.name}\" {exc.reason}. Please specify a valid model.\n\nYour models:\n{available}",
        param="model",
        code="model_not_found",
    )


def _check_kind(name: str, actual: str, kind: str) -> None:
    if actual != kind:
        what = "an embedding model" if actual == "embedding" else "not an embedding model"
        raise APIError(400, f"Model \"{name}\" is {what}; it cannot serve this endpoint.", param="model",
                       code="model_not_supported")


async def acquire(manager: ModelManager, name: str, *, ttl: float | None, kind: str) -> ModelInstance:
    try:
        if manager.settings.jit and manager.find_loaded(name) is None:
            # Refuse before JIT-loading: a request that cannot be served must not evict other models.
            _check_kind(name, manager.store.resolve(name).type, kind)
        instance = await manager.acquire(name, ttl=ttl)
    except ModelNotFound as exc:
        raise model_not_found(exc) from None
    _check_kind(name, instance.type, kind)
    return instance


def submit(
    instance: ModelInstance, prompt: Sequence[int], params: SamplingParams, *, param: str = "messages"
) -> GenerationRequest:
    engine = instance.engine
    assert isinstance(engine, GenerationEngine)
    if len(prompt) >= engine.n_ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.n_ctx} tokens. However, your request has "
            f"{len(prompt)} prompt tokens. Shorten the prompt or load the model with a larger context_length.",
            param=param,
            code="context_length_exceeded",
        )
    return engine.submit(prompt, params)


async def collect(request: GenerationRequest) -> tuple[str, Finish]:
    """Runs a request to the end; cancelling the caller cancels the request."""
    parts: list[str] = []
    try:
        async for events in request:
            for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                else:
                    if event.reason == "error":
                        raise APIError(500, f"Generation failed: {event.error}", type="server_error")
                    return "".join(parts), event
    finally:
        request.cancel()
    raise APIError(500, "generation ended without a result", type="server_error")


def usage(finish: Finish) -> dict[str, object]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
    }


def finish_reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"
