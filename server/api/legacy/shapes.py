"""v0's model objects and the `stats` / `model_info` / `runtime` blocks it adds to OpenAI bodies."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from ...engine import llama_lib
from ...engine.events import Finish
from ...engine.sampling import SamplingParams
from ...runtime.instance import ModelInstance
from ...store.model_store import ModelVariant
from ..chat_run import Round

StopReason = Literal["userStopped", "failed", "eosFound", "stopStringFound", "toolCalls",
                     "maxPredictedTokensReached", "contextLengthReached"]


def model_type(variant: ModelVariant) -> Literal["llm", "vlm", "embeddings"]:
    """v0's plural `embeddings` (v1 says `embedding`); `vlm` for a model with a vision projector."""
    if variant.type == "embedding":
        return "embeddings"
    return "vlm" if variant.mmproj_path is not None else "llm"


def capabilities(variant: ModelVariant) -> list[str]:
    caps = []
    if variant.trained_for_tool_use:
        caps.append("tool_use")
    if variant.mmproj_path is not None:
        caps.append("vision")
    return caps


def model_object(model_id: str, publisher: str, variant: ModelVariant,
                 instance: ModelInstance | None) -> dict[str, Any]:
    """One entry of GET /api/v0/models, keys in LM Studio's order; `capabilities` only when there are any."""
    obj: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "type": model_type(variant),
        "publisher": publisher,
        "arch": variant.architecture,
        "compatibility_type": "gguf",
        "quantization": variant.quant,
        "state": "loaded" if instance is not None else "not-loaded",
        "max_context_length": variant.context_length,
    }
    if instance is not None:
        obj["loaded_context_length"] = instance.context_length
    if caps := capabilities(variant):
        obj["capabilities"] = caps
    return obj


def stop_reason(finish: Finish, params: SamplingParams, *, tool_calls: bool = False) -> StopReason:
    """The SDK's LLMPredictionStopReason for how a generation ended."""
    if tool_calls:
        return "toolCalls"
    match finish.reason:
        case "stop":
            return "stopStringFound" if finish.stop_sequence is not None else "eosFound"
        case "length":
            # The engine also ends a request with "length" when the context is full.
            hit_limit = params.max_tokens is not None and finish.completion_tokens >= params.max_tokens
            return "maxPredictedTokensReached" if hit_limit else "contextLengthReached"
        case "cancelled":
            return "userStopped"
        case _:
            return "failed"


def stats(finish: Finish, params: SamplingParams, *, tool_calls: bool = False) -> dict[str, Any]:
    return {
        "tokens_per_second": finish.tokens_per_second,
        "time_to_first_token": finish.time_to_first_token if finish.time_to_first_token is not None else 0.0,
        "generation_time": finish.generation_seconds,
        "stop_reason": stop_reason(finish, params, tool_calls=tool_calls),
        **finish.draft_stats(),
    }


def model_info(instance: ModelInstance) -> dict[str, Any]:
    variant = instance.variant
    return {"arch": variant.architecture, "quant": variant.quant, "format": "gguf",
            "context_length": instance.context_length}


@cache
def runtime() -> dict[str, Any]:
    try:
        llama_version = version("llama_cpp_python")
    except PackageNotFoundError:  # pragma: no cover - always installed alongside the server
        llama_version = "unknown"
    device = "gpu" if llama_lib.gpu_offload_supported() else "cpu"
    name = f"llama.cpp-{platform.system().lower()}-{platform.machine().lower()}-{device}"
    return {"name": name, "version": llama_version, "supported_formats": ["gguf"]}


def decorate(body: dict[str, Any], round: Round) -> dict[str, Any]:
    """An OpenAI completion body (of the finished `round`) in v0's shape: no system_fingerprint, v0's usage,
    then the three blocks."""
    assert round.finish is not None
    body.pop("system_fingerprint", None)
    usage = body["usage"]
    body["usage"] = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    tool_calls = round.prepared is not None and bool(round.result.tool_calls)
    body["stats"] = stats(round.finish, round.params, tool_calls=tool_calls)
    body["model_info"] = model_info(round.instance)
    body["runtime"] = runtime()
    return body
