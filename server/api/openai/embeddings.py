"""POST /v1/embeddings: string, strings, token ids or lists of token ids."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Annotated, Any

from fastapi import Depends, Request

from ...engine.embedding import EmbeddingEngine, InputTooLong
from ...engine.llama_lib import TooManyTokens
from ...errors import bad_request
from ...runtime.instance import ModelInstance
from ...runtime.manager import ModelManager
from ...streaming import unless_disconnected
from .. import inference
from ..deps import get_manager
from .schemas import EmbeddingRequest


def _inputs(instance: ModelInstance, raw: Any) -> list[list[int]]:
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise bad_request("'input' must not be empty", param="input")
    tokenized: list[list[int]] = []
    n_vocab = instance.model.n_vocab
    assert isinstance(instance.engine, EmbeddingEngine)
    limit = instance.engine.context.config.n_batch  # the engine's own limit (EmbeddingEngine.embed)
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("'input' must not contain empty strings", param="input")
            try:
                tokenized.append(instance.model.tokenize(item, add_special=True, parse_special=False, limit=limit))
            except TooManyTokens as exc:
                raise bad_request(f"input of {exc.count} tokens is longer than this model's context of {limit} "
                                  "tokens", param="input", code="context_length_exceeded") from None
        elif item and all(isinstance(t, int) and 0 <= t < n_vocab for t in item):
            tokenized.append(list(item))
        else:
            raise bad_request(f"token ids in 'input' must be in 0..{n_vocab - 1} and not empty", param="input")
    return tokenized


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # the openai SDK asks for this by default
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def create_embeddings(
    body: EmbeddingRequest, request: Request, manager: ModelManager
) -> tuple[dict[str, Any], ModelInstance]:
    """The embeddings list body and the instance that computed it."""
    instance = await inference.acquire(manager, body.model, ttl=body.ttl, kind="embedding")
    engine = instance.engine
    assert isinstance(engine, EmbeddingEngine)
    with instance.in_use():
        inputs = await asyncio.to_thread(_inputs, instance, body.input)
        try:
            vectors = await unless_disconnected(request, engine.embed(inputs))
        except InputTooLong as exc:
            raise bad_request(str(exc), param="input", code="context_length_exceeded") from None
    if body.dimensions is not None:
        vectors = [v[: body.dimensions] for v in vectors]
    n_tokens = sum(len(t) for t in inputs)
    response = {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": _encode(v, body.encoding_format), "index": i}
            for i, v in enumerate(vectors)
        ],
        "model": instance.id,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    return response, instance


async def embeddings(
    body: EmbeddingRequest, request: Request, manager: Annotated[ModelManager, Depends(get_manager)]
) -> dict[str, Any]:
    response, _ = await create_embeddings(body, request, manager)
    return response
