"""Shared by every API family: finding the instance for a request and running a generation."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lmkube.random_ids import random_string

from ..config import SamplingDefaults
from ..engine.events import Finish, TextDelta
from ..engine.generation import GenerationEngine
from ..engine.llama_lib import ModelLoadError
from ..engine.sampling import SamplingParams
from ..engine.slot import GenerationRequest
from ..engine.speculative import Draft, DraftIncompatible, DraftSettings
from ..engine.vision import PromptImages
from ..errors import APIError, ContextOverflow
from ..logs import observe
from ..runtime.instance import ModelInstance
from ..runtime.manager import ModelManager
from ..runtime.progress import Listener
from ..store.model_store import ModelNotFound

_ID_ALPHABET = string.ascii_lowercase + string.digits


def random_id(prefix: str, length: int = 21) -> str:
    return prefix + random_string(_ID_ALPHABET, length)


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


async def acquire(manager: ModelManager, name: str, *, ttl: float | None, kind: str,
                  on_progress: Listener | None = None) -> ModelInstance:
    try:
        if manager.settings.jit and manager.find_loaded(name) is None:
            # Refuse before JIT-loading: a request that cannot be served must not evict other models.
            _check_kind(name, manager.store.resolve(name).type, kind)
        instance = await manager.acquire(name, ttl=ttl, on_progress=on_progress)
    except ModelNotFound as exc:
        raise model_not_found(exc) from None
    _check_kind(name, instance.type, kind)
    return instance


def submit(
    instance: ModelInstance, prompt: Sequence[int], params: SamplingParams, *, param: str = "messages",
    images: PromptImages | None = None, report_prefill: bool = False,
) -> GenerationRequest:
    engine = instance.engine
    assert isinstance(engine, GenerationEngine)
    if len(prompt) >= engine.n_ctx:
        raise ContextOverflow(len(prompt), engine.n_ctx, param=param)
    return observe(instance, engine.submit(prompt, params, draft(instance, params), images,
                                           report_prefill=report_prefill))


def draft_not_found(exc: ModelNotFound) -> APIError:
    available = "\n".join(f"  - {n}" for n in exc.available) or "  (none)"
    return APIError(404, f"Draft model \"{exc.name}\" {exc.reason}.\n\nYour models:\n{available}",
                    param="draft_model", code="model_not_found")


async def load_draft(instance: ModelInstance, params: SamplingParams) -> None:
    """Loads the request's draft model off the event loop (else `submit` loads it in place, blocking the
    loop for the load); raises the same errors as `submit` would."""
    if params.draft_model:
        await asyncio.to_thread(draft, instance, params)


def draft(instance: ModelInstance, params: SamplingParams) -> Draft | None:
    """The request's draft model (or the instance's default one), loading it on first use."""
    name = params.draft_model
    try:
        drafter = instance.drafter(name) if name else instance.default_draft
    except ModelNotFound as exc:
        raise draft_not_found(exc) from None
    except (DraftIncompatible, ModelLoadError, ValueError) as exc:
        raise APIError(400, str(exc), param="draft_model", code="draft_model_incompatible") from None
    if drafter is None:
        return None
    defaults = DraftSettings()
    settings = DraftSettings(
        max_tokens=defaults.max_tokens if params.draft_max is None else params.draft_max,
        min_tokens=defaults.min_tokens if params.draft_min is None else params.draft_min,
        p_min=defaults.p_min if params.draft_p_min is None else params.draft_p_min,
    )
    return Draft(drafter, settings) if settings.max_tokens > 0 else None


async def collect(request: GenerationRequest) -> tuple[str, Finish]:
    """Runs a request to the end; cancelling the caller cancels the request."""
    parts: list[str] = []
    try:
        async for events in request:
            for event in events:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Finish):
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


# Request fields that map one to one onto SamplingParams, under the same names in every API family.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repeat_penalty", "seed", "draft_model", "draft_max", "draft_min", "draft_p_min")


def sampling_params(request: Any, defaults: SamplingDefaults, *, max_tokens: int | None) -> SamplingParams:
    """SamplingParams from a request model's sampling fields (those it lacks or leaves None take the
    server's `defaults`); a negative or absent `max_tokens` means no limit."""
    params = SamplingParams(max_tokens=None if max_tokens is None or max_tokens < 0 else max_tokens,
                            **asdict(defaults))
    for name in SAMPLING_FIELDS:
        if (value := getattr(request, name, None)) is not None:
            setattr(params, name, value)
    return params


def reasoning_tokens(instance: ModelInstance, reasoning: str, completion_tokens: int) -> int:
    """How many of the generated tokens were reasoning (re-tokenized: the engine counts them all alike)."""
    if not reasoning:
        return 0
    return min(len(instance.model.tokenize(reasoning, add_special=False, parse_special=False)), completion_tokens)


def draft_stats(finish: Finish) -> dict[str, object]:
    """LM Studio's `stats` on OpenAI-compatible responses of speculative requests (seen there in 2026)."""
    return {"tokens_per_second": finish.tokens_per_second,
            "time_to_first_token": finish.time_to_first_token or 0.0,
            "generation_time": finish.generation_seconds, **finish.draft_stats()}


def add_draft_stats(totals: dict[str, Any], finish: Finish) -> None:
    """Adds one generation's draft counts to `totals`, a tool loop's stats over all its rounds."""
    for key, value in finish.draft_stats().items():
        totals[key] = value if isinstance(value, str) else totals.get(key, 0) + value


def finish_reason(finish: Finish) -> str:
    return "length" if finish.reason == "length" else "stop"
