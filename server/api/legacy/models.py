"""GET /api/v0/models and /api/v0/models/{model}: every downloaded model, loaded or not."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends

from ...errors import APIError
from ...runtime.manager import ModelManager
from ..deps import get_manager
from .shapes import model_object


def list_model_objects(manager: ModelManager) -> list[dict[str, Any]]:
    """One object per downloaded model (describing the variant a request for it would hit), then each
    loaded instance that is known by another name (a custom identifier)."""
    objects = []
    publishers = {}
    for entry in manager.store.scan():
        publishers[entry.key] = entry.publisher
        if entry.default_variant is None:
            continue
        instance = manager.find_loaded(entry.key)
        variant = instance.variant if instance is not None else entry.default_variant
        objects.append(model_object(entry.key, entry.publisher, variant, instance))
    listed = {o["id"] for o in objects}
    for instance in manager.loaded():
        if instance.id not in listed:
            key = instance.variant.model_key
            publisher = publishers.get(key, key.split("/", 1)[0])
            objects.append(model_object(instance.id, publisher, instance.variant, instance))
    return objects


def find_model_object(manager: ModelManager, name: str) -> dict[str, Any] | None:
    wanted = name.strip().lower()
    for obj in list_model_objects(manager):
        if obj["id"].lower() == wanted:
            return obj
    for entry in manager.store.scan():  # a variant key, e.g. publisher/model@q4_k_m
        for variant in entry.variants:
            if variant.key == wanted:
                instance = manager.find_loaded(variant.key)
                return model_object(variant.key, entry.publisher, variant, instance)
    return None


async def list_models(manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    return {"object": "list", "data": list_model_objects(manager)}


async def get_model(model: str, manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    obj = find_model_object(manager, model)
    if obj is None:
        raise APIError(404, f"Model \"{model}\" not found.", param="model", code="model_not_found")
    return obj
