"""GET /v1/models in LM Studio's shape: data before object, no `created`, owned_by organization_owner."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends

from ...errors import APIError
from ...runtime.manager import ModelManager
from ..deps import get_manager


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "owned_by": "organization_owner"}


async def list_models(manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    return {"data": [_model(m) for m in manager.listed_model_ids()], "object": "list"}


async def retrieve_model(model_id: str, manager: Annotated[ModelManager, Depends(get_manager)]) -> dict[str, Any]:
    wanted = model_id.lower()
    for listed in manager.listed_model_ids():
        if listed.lower() == wanted:
            return _model(listed)
    raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
