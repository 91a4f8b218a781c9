"""What a request is: which model it is for, which conversation (for affinity), and the model lists.

Inference routes carry the model in the JSON body; `GET /v1/models/{id}` and `/api/v0/models/{id}` in the
path. The lists (`/v1/models`, `/api/v1/models`, `/api/v0/models`) are the union over the LocalModels the
key may use, running or not: a running model's entry comes from one of its replicas (so it says what the
pod has loaded), a stopped one's is made from what the LocalModel says.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import httpx

from .catalog import ServedModel

# POST routes whose JSON body names the model (every inference route of every family).
BODY_MODEL_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
    "/v1/messages", "/v1/messages/count_tokens",
    "/api/v1/chat", "/api/v0/chat/completions", "/api/v0/completions", "/api/v0/embeddings",
})
LIST_ROUTES = frozenset({"/v1/models", "/api/v1/models", "/api/v0/models"})
MODEL_INFO_PREFIXES = ("/v1/models/", "/api/v0/models/")
# Loading, unloading and downloading are the operator's job (LocalModel spec), not a client's.
MANAGEMENT_ROUTES = frozenset({"/api/v1/models/load", "/api/v1/models/unload", "/api/v1/models/download"})
# Routes whose answers carry a stored response id that a later `previous_response_id` continues.
RESPONSE_ID_ROUTES = frozenset({"/v1/responses", "/api/v1/chat"})
RESPONSE_ID = re.compile(rb"resp_[0-9a-f]{48}")

PREFIX_CHARS = 256  # how much of the conversation's start picks its replica


def model_from_path(path: str) -> str | None:
    for prefix in MODEL_INFO_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return path[len(prefix):]
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(part) for part in value)
    if isinstance(value, dict):
        for field in ("text", "content", "input_text"):
            if field in value:
                return _text(value[field])
    return ""


def affinity_key(body: dict[str, Any]) -> str | None:
    """The conversation's start: its system prompt and first user message (both stay the same turn after
    turn, while the end of the conversation grows), cut to PREFIX_CHARS."""
    parts = [_text(body.get(field)) for field in ("system", "system_prompt", "instructions")]
    for field in ("messages", "input", "prompt"):
        value = body.get(field)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for item in value:
                parts.append(_text(item))
                if not isinstance(item, dict) or item.get("role", "user") == "user":
                    break
    prefix = "\n".join(part for part in parts if part)[:PREFIX_CHARS]
    return prefix or None


def listed_names(models: Sequence[ServedModel]) -> dict[str, str]:
    """The id each model is listed under: its key, or `namespace/name` where two models share a key."""
    counts: dict[str, int] = {}
    for model in models:
        key = (model.model_key or model.name).lower()
        counts[key] = counts.get(key, 0) + 1
    return {model.id: (model.model_key or model.name) if counts[(model.model_key or model.name).lower()] == 1
            else model.id for model in models}


def openai_list(models: Sequence[ServedModel]) -> dict[str, Any]:
    names = listed_names(models)
    return {"data": [openai_model(names[m.id]) for m in models], "object": "list"}


def openai_model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "owned_by": "organization_owner"}


def _publisher(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else "local"


def native_stub(model: ServedModel, listed: str) -> dict[str, Any]:
    """A /api/v1/models entry for a model no replica serves right now."""
    return {"type": "llm", "publisher": _publisher(model.model_key or model.name), "key": listed,
            "display_name": model.name, "loaded_instances": [], "format": "gguf", "variants": [],
            "selected_variant": None}


def legacy_stub(model: ServedModel, listed: str) -> dict[str, Any]:
    """A /api/v0/models entry for a model no replica serves right now."""
    return {"id": listed, "object": "model", "type": "llm", "publisher": _publisher(model.model_key or model.name),
            "compatibility_type": "gguf", "state": "not-loaded"}


async def _replica_entry(client: httpx.AsyncClient, model: ServedModel, path: str, headers: dict[str, str],
                         field: str, pick: str | None) -> dict[str, Any] | None:
    if pick is None or model.model_key is None:
        return None
    try:
        response = await client.get(f"{pick}{path}", headers=headers, timeout=5)
        response.raise_for_status()
        items = response.json()["models" if path == "/api/v1/models" else "data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    wanted = model.model_key.lower()
    return next((item for item in items if str(item.get(field, "")).lower() == wanted), None)


async def native_list(client: httpx.AsyncClient, models: Sequence[ServedModel], path: str,
                      headers: dict[str, str], picks: dict[str, str | None]) -> dict[str, Any]:
    """`/api/v1/models` ({"models": [...]}) or `/api/v0/models` ({"object": "list", "data": [...]})."""
    field = "key" if path == "/api/v1/models" else "id"
    names = listed_names(models)
    found = await asyncio.gather(*(_replica_entry(client, m, path, headers, field, picks.get(m.id))
                                   for m in models))
    entries = []
    for model, entry in zip(models, found, strict=True):
        listed = names[model.id]
        if entry is None:
            entry = native_stub(model, listed) if field == "key" else legacy_stub(model, listed)
        else:
            entry = {**entry, field: listed}
        entries.append(entry)
    return {"models": entries} if field == "key" else {"object": "list", "data": entries}
