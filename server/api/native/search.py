"""Hub look-ups behind `lmkube get` (lmkube extensions; LM Studio's `lms get` searches its own catalog):
- GET /api/v1/models/search?q=...: GGUF repos on the Hugging Face Hub matching a keyword;
- GET /api/v1/models/search/variants?repo=org/name: the GGUF variants a download of that repo can pick.

The server asks the Hub (HF_ENDPOINT, HF_TOKEN apply) so a CLI on another machine needs no Hub access."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Query

from ...errors import APIError


def _search(query: str, limit: int) -> list[dict[str, Any]]:
    from huggingface_hub import HfApi

    found = []
    for info in HfApi().list_models(search=query, filter="gguf", limit=limit, sort="downloads"):
        found.append({"id": info.id, "downloads": getattr(info, "downloads", None),
                      "likes": getattr(info, "likes", None)})
    return found


async def search_models(q: str = Query(min_length=1), limit: int = Query(default=10, ge=1, le=100)) -> dict[str, Any]:
    try:
        results = await asyncio.to_thread(_search, q.strip(), limit)
    except Exception as exc:  # the Hub unreachable, offline mode, HTTP errors: one clear 502
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise APIError(502, f"Hugging Face Hub search failed: {first}", type="server_error",
                       code="hub_error") from None
    return {"query": q, "results": results}


def _variants(repo_id: str) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    from ...downloads.resolver import RemoteFile, _variants
    from ...store.quant import pick_default

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except RepositoryNotFoundError:
        raise APIError(404, f"Hugging Face repo '{repo_id}' was not found.", code="model_not_found") from None
    except HFValidationError as exc:  # the Hub's own naming rules (no trailing '.', at most 96 characters)
        first = str(exc).strip().splitlines()[0]
        raise APIError(400, f"'{repo_id}' is not a valid Hugging Face repo id: {first}", param="repo") from None
    files = [RemoteFile(s.rfilename, s.size, None) for s in info.siblings or []
             if s.rfilename.lower().endswith(".gguf") and "mmproj" not in s.rfilename.lower()]
    groups = _variants(files)
    default = pick_default(groups.keys())
    variants = [{"quantization": name, "size_bytes": sum(f.size or 0 for f in group),
                 "files": [f.name for f in group], "default": name == default} for name, group in groups.items()]
    return {"repo": info.id, "variants": variants}


async def repo_variants(repo: str = Query(pattern=r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(_variants, repo)
    except APIError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise APIError(502, f"Hugging Face Hub error for '{repo}': {first}", type="server_error",
                       code="hub_error") from None
